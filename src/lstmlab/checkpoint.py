"""Checkpoints as safetensors files: tensors plus the JSON config in the metadata, so loading
never unpickles code and a model is rebuilt from the file alone."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lstmlab.config import MAX_HIDDEN_SIZE, MAX_LAYERS, Config, validate_config
from lstmlab.errors import LstmlabError
from lstmlab.files import atomic_write_bytes
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


MAX_HEADER_BYTES = 16 * 1024 * 1024  # a checkpoint's JSON header is a few KB; refuse anything claiming more
# safetensors dtype name -> (torch dtype, bytes per element); only those a checkpoint may hold
_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4),
}
_FIX = "use a checkpoint written by `lstmlab train` (this one is damaged or was edited)"


@dataclass
class _TensorEntry:
    """One tensor as the safetensors header describes it; ``start``/``end`` are absolute file offsets."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def read_header(path: Path) -> tuple[dict[str, str], dict[str, _TensorEntry]]:
    """The metadata and tensor table of a safetensors file, from its first 8 bytes and JSON header only.

    Checks that every tensor's bytes lie inside the file and match its dtype and shape, so that nothing
    read afterwards can be larger than the file itself.
    """
    bad = f"{path} is not a readable lstmlab checkpoint"
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise LstmlabError(f"{bad} (safetensors: only {len(head)} bytes); {_FIX}")
            header_len = int.from_bytes(head, "little")
            if header_len > MAX_HEADER_BYTES or header_len > size - 8:
                raise LstmlabError(
                    f"{bad} (safetensors: its header claims {header_len:,} bytes in a {size:,}-byte file); {_FIX}"
                )
            raw = f.read(header_len)
    except OSError as e:
        raise LstmlabError(f"cannot read checkpoint {path} ({e.strerror or e}); check the path and its permissions") \
            from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise LstmlabError(f"{bad} (safetensors: header is not JSON: {e}); {_FIX}") from None
    if not isinstance(header, dict):
        raise LstmlabError(f"{bad} (safetensors: header is not a JSON object); {_FIX}")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise LstmlabError(f"{bad} (safetensors: __metadata__ is not a table of strings); {_FIX}")
    data_start = 8 + header_len
    entries: dict[str, _TensorEntry] = {}
    data_end = 0
    for name, spec in header.items():
        try:
            dtype, shape, (begin, end) = spec["dtype"], spec["shape"], spec["data_offsets"]
            if not (isinstance(dtype, str) and isinstance(shape, list)
                    and all(type(d) is int and d >= 0 for d in (*shape, begin, end))):
                raise TypeError
        except (TypeError, ValueError, KeyError):
            raise LstmlabError(f"{bad} (safetensors: tensor {name!r} is badly described); {_FIX}") from None
        numel = math.prod(shape)
        item = _DTYPES[dtype][1] if dtype in _DTYPES else None
        if item is not None and end - begin != numel * item:
            raise LstmlabError(
                f"{bad} (safetensors: tensor {name!r} has {end - begin} bytes for shape {shape}); {_FIX}"
            )
        if begin > end or data_start + end > size:
            raise LstmlabError(f"{bad} (safetensors: tensor {name!r} lies past the end of the file, which is "
                               f"truncated); {_FIX}")
        data_end = max(data_end, end)
        entries[name] = _TensorEntry(dtype, tuple(shape), data_start + begin, data_start + end)
    if data_start + data_end != size:
        raise LstmlabError(f"{bad} (safetensors: {size - data_start - data_end} bytes after the last tensor); {_FIX}")
    return metadata, entries


def _type_ok(value: Any, annotation: str) -> bool:
    """Whether a JSON value fits a dataclass field's annotation (a string, e.g. ``"float | None"``)."""
    kinds = [a.strip() for a in str(annotation).split("|")]
    if value is None:
        return "None" in kinds
    for kind in kinds:
        if kind == "bool" and isinstance(value, bool):
            return True
        if kind == "int" and type(value) is int:
            return True
        if kind == "float" and type(value) in (int, float):
            return math.isfinite(value)
        if kind == "str" and isinstance(value, str):
            return True
        if kind not in ("bool", "int", "float", "str", "None"):
            return True  # a type this check does not know: leave it to the config's own validation
    return False


def check_config(config: Config) -> None:
    """Refuse a checkpoint's config that the CLI would refuse, plus what only a file can get wrong: field types,
    sizes beyond ``MAX_HIDDEN_SIZE``/``MAX_LAYERS``, unknown dataset or view, input size, class count, mean/std."""
    from lstmlab.data import DATASETS, VIEWS

    for section in ("model", "data", "train"):
        part = getattr(config, section)
        for f in dataclasses.fields(part):
            value = getattr(part, f.name)
            if not _type_ok(value, f.type):
                raise LstmlabError(f"{section}.{f.name} is {value!r}, not a finite {f.type}")
    if not isinstance(config.recipe, str):
        raise LstmlabError(f"recipe is {config.recipe!r}, not a string")
    m, d = config.model, config.data
    if not 0 < m.hidden_size <= MAX_HIDDEN_SIZE:
        raise LstmlabError(f"model.hidden_size is {m.hidden_size}, outside 1..{MAX_HIDDEN_SIZE}")
    if not 0 < m.num_layers <= MAX_LAYERS:
        raise LstmlabError(f"model.num_layers is {m.num_layers}, outside 1..{MAX_LAYERS}")
    if d.dataset not in DATASETS:
        raise LstmlabError(f"data.dataset is {d.dataset!r}, not one of {', '.join(DATASETS)}")
    if d.view not in VIEWS:
        raise LstmlabError(f"data.view is {d.view!r}, not one of {', '.join(VIEWS)}")
    if m.input_size != VIEWS[d.view][1]:
        raise LstmlabError(f"model.input_size is {m.input_size}, but the {d.view} view gives {VIEWS[d.view][1]}")
    classes = len(DATASETS[d.dataset].classes)
    if m.num_classes != classes:
        raise LstmlabError(f"model.num_classes is {m.num_classes}, but {d.dataset} has {classes} classes")
    if d.mean is None or d.std is None:
        raise LstmlabError("data.mean and data.std are missing (training fills them in)")
    if not d.std > 0:
        raise LstmlabError(f"data.std is {d.std}, not a positive number")
    validate_config(config)  # the CLI's own checks, last: they assume the types checked above


def _read_tensor(f: Any, entry: _TensorEntry) -> Tensor:
    """One tensor's bytes from an open checkpoint, as described by its (already checked) header entry."""
    dtype, _ = _DTYPES[entry.dtype]
    f.seek(entry.start)
    raw = bytearray(f.read(entry.end - entry.start))
    if len(raw) != entry.end - entry.start:
        raise OSError("the file became shorter while being read")
    if not raw:
        return torch.empty(entry.shape, dtype=dtype)
    return torch.frombuffer(raw, dtype=dtype).reshape(entry.shape)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint written by ``save_checkpoint``; anything else is a one-line LstmlabError.

    Everything is checked before a tensor is allocated: the header (read alone, never the whole file), the
    config (``check_config``), every tensor's dtype and shape against the model the config describes (built on
    the meta device: no memory); then the tensors are read and must be finite, the permutation a permutation.
    """
    path = Path(path)
    if path.is_dir():
        raise LstmlabError(f"checkpoint {path} is a folder; pass a .safetensors file in it (e.g. best.safetensors)")
    if not path.is_file():
        raise LstmlabError(f"checkpoint {path} does not exist; pass the .safetensors file a training run wrote")
    metadata, entries = read_header(path)
    config, meta = _header_config(path, metadata)
    expected = _expected_tensors(path, config, entries)
    tensors = _read_tensors(path, entries, expected)
    permutation = tensors.pop("permutation", None)
    if permutation is not None:
        n = expected["permutation"][1][0]
        if not torch.equal(permutation.sort().values, torch.arange(n, dtype=permutation.dtype)):
            raise LstmlabError(f"{path}: the stored permutation is not a permutation of 0..{n - 1}; {_FIX}")
        permutation = permutation.long()
    model = SequenceClassifier(config.model)
    state = {k.removeprefix("model."): v for k, v in tensors.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise LstmlabError(f"{path}: weights do not match the saved config ({first})") from None
    model.to(map_location).eval()
    return Checkpoint(model=model, config=config, permutation=permutation, meta=meta)


def _header_config(path: Path, metadata: dict[str, str]) -> tuple[Config, dict[str, Any]]:
    """The config and meta of an lstmlab checkpoint's header, checked."""
    if metadata.get("format") != FORMAT:
        raise LstmlabError(f"{path} is a safetensors file but not an lstmlab checkpoint (no lstmlab metadata)")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise LstmlabError(
            f"{path} has checkpoint format {metadata.get('format_version')!r}; this lstmlab reads {FORMAT_VERSION!r}"
        )
    try:
        raw_config = json.loads(metadata["config"])
        meta = json.loads(metadata.get("meta", "{}"))
        if not isinstance(raw_config, dict) or not isinstance(meta, dict):
            raise ValueError("not a JSON object")
        config = Config.from_dict(raw_config)
        check_config(config)
    except (KeyError, ValueError, RecursionError) as e:
        raise LstmlabError(f"{path}: the checkpoint's config is damaged ({e}); {_FIX}") from None
    except LstmlabError as e:
        raise LstmlabError(f"{path}: the checkpoint's config is invalid: {e}; {_FIX}") from None
    return config, meta


def _expected_tensors(path: Path, config: Config, entries: dict[str, Any]) -> dict[str, tuple[torch.dtype, tuple]]:
    """Name -> (dtype, shape) of every tensor the config's model needs, each checked against the header's entry."""
    from lstmlab.data import VIEWS

    try:
        with torch.device("meta"):  # shapes of the model the config describes, without allocating it
            shapes = SequenceClassifier(config.model).state_dict()
    except (ValueError, RuntimeError, TypeError) as e:  # a combination the checks above did not foresee
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LstmlabError(f"{path}: the checkpoint's config describes no buildable model ({first}); {_FIX}") \
            from None
    expected = {f"model.{k}": (v.dtype, tuple(v.shape)) for k, v in shapes.items()}
    steps, inputs = VIEWS[config.data.view]
    if config.data.view == "permuted":
        expected["permutation"] = (torch.int64, (steps * inputs,))
    missing = sorted(set(expected) - set(entries))
    extra = sorted(k for k in entries if k.startswith("model.") and k not in expected)
    if missing or extra:
        what = f"lacks {', '.join(missing[:3])}" if missing else f"has unexpected {', '.join(extra[:3])}"
        raise LstmlabError(f"{path}: weights do not match the saved config (it {what}); {_FIX}")
    for name, (dtype, shape) in expected.items():
        entry = entries[name]
        if entry.dtype not in _DTYPES or _DTYPES[entry.dtype][0].is_floating_point != dtype.is_floating_point:
            raise LstmlabError(f"{path}: tensor {name} has dtype {entry.dtype}; {_FIX}")
        if entry.shape != shape:
            raise LstmlabError(f"{path}: weights do not match the saved config ({name} has shape "
                               f"{list(entry.shape)}, the config gives {list(shape)}); {_FIX}")
    return expected


def _read_tensors(path: Path, entries: dict[str, Any], expected: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The expected tensors, read from the file; floating ones must be finite."""
    try:
        with open(path, "rb") as f:
            tensors = {name: _read_tensor(f, entries[name]) for name in expected}
    except OSError as e:
        raise LstmlabError(f"cannot read checkpoint {path} ({e.strerror or e}); check the file") from None
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise LstmlabError(f"{path}: tensor {name} holds NaN or infinite values (a diverged run?); {_FIX}")
    return tensors
