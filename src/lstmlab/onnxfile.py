"""A trained classifier as an ONNX file that onnxruntime runs without lstmlab or torch, and back
(``lstmlab export`` writes one, ``lstmlab predict model.onnx`` reads one).

The LSTM goes out as ONNX's own ``LSTM`` operator (lstmlab.LSTM hands ONNX export to PyTorch's kernel path,
which the exporters map to it), the batch size stays free, and the checkpoint's config rides along in the
file's metadata so that ``lstmlab predict model.onnx IMAGE`` preprocesses images exactly as training did.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lstmlab.checkpoint import Checkpoint
from lstmlab.config import Config
from lstmlab.errors import LstmlabError

OPSET = 17
METADATA_KEY = "lstmlab_config"
MAX_ONNX_BYTES = 256 << 20


def _onnx() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise LstmlabError("ONNX export needs onnx and onnxruntime: pip install 'lstmlab[export]'") from None
    return onnx, onnxruntime


def export_onnx(ckpt: Checkpoint, path: str | Path) -> float:
    """Write ``ckpt``'s classifier to ``path`` as ONNX (input ``x`` (B, T, I), output ``logits`` (B, C)), checked in
    onnxruntime at a batch size other than the traced one; returns that check's largest absolute difference."""
    from lstmlab.data import VIEWS
    from lstmlab.files import atomic_write_bytes

    _onnx()  # before any work: a missing package is one line
    model = ckpt.model.eval()
    steps, inputs = VIEWS[ckpt.config.data.view]
    graph = onnx_graph(model, steps, inputs)
    entry = graph.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(ckpt.config.to_dict())
    if ckpt.permutation is not None:
        entry = graph.metadata_props.add()
        entry.key, entry.value = "lstmlab_permutation", json.dumps(ckpt.permutation.tolist())
    data = graph.SerializeToString()
    check = torch.randn(5, steps, inputs, generator=torch.Generator().manual_seed(0))
    runner = OnnxClassifier(data)
    with torch.no_grad():
        err = (runner(check) - model(check)).abs().max().item()
    if not err <= 1e-4:
        raise LstmlabError(f"the ONNX model differs from the checkpoint by {err:.2e}; nothing was written")
    atomic_write_bytes(Path(path), data)
    return err


def onnx_graph(model: nn.Module, steps: int, inputs: int) -> Any:
    """A classifier (B, T, I) -> logits as an ONNX graph (``onnx.ModelProto``) whose LSTM is ONNX's ``LSTM``
    operator, batch size free; traced at T = ``steps``, I = ``inputs``. What ``lstmlab export`` writes (and
    ``lstmlab bench`` times in onnxruntime), before the metadata."""
    onnx, _ = _onnx()
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on nn.LSTM's shape checks are not the user's concern
        torch.onnx.export(  # TorchScript exporter: it keeps the batch free for every LSTM configuration
            model, (torch.zeros(2, steps, inputs),), buffer, dynamo=False, opset_version=OPSET, input_names=["x"],
            output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
        )
    graph = onnx.load_from_string(buffer.getvalue())
    if not any(node.op_type == "LSTM" for node in graph.graph.node):
        raise LstmlabError("the exported graph has no ONNX LSTM operator; this lstmlab cannot export this model")
    return graph


class OnnxClassifier(nn.Module):
    """An exported classifier run by onnxruntime, callable like the torch model: (B, T, I) -> logits (B, C)."""

    def __init__(self, model: bytes) -> None:
        super().__init__()
        _, ort = _onnx()
        self.session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])

    def forward(self, x: Tensor) -> Tensor:
        (logits,) = self.session.run(["logits"], {"x": x.detach().float().cpu().numpy()})
        return torch.from_numpy(logits)


def load_onnx(path: str | Path) -> Checkpoint:
    """An ONNX file written by ``lstmlab export``, as a Checkpoint whose model runs in onnxruntime."""
    from lstmlab.checkpoint import check_config
    from lstmlab.data import VIEWS

    onnx, _ = _onnx()
    path = Path(path)
    try:
        if path.stat().st_size > MAX_ONNX_BYTES:  # a classifier is well under 1 MB: refuse before reading it
            raise LstmlabError(f"{path} is over {MAX_ONNX_BYTES >> 20} MB, not a model `lstmlab export` wrote")
        data = path.read_bytes()
        graph = onnx.load_from_string(data)
    except LstmlabError:
        raise
    except OSError as e:
        raise LstmlabError(f"cannot read {path}: {e.strerror or e}; pass the .onnx file `lstmlab export` wrote") \
            from None
    except Exception as e:  # noqa: BLE001 - protobuf's decode errors have no common public base
        raise LstmlabError(f"{path} is not an ONNX model ({type(e).__name__}); pass a file `lstmlab export` wrote") \
            from None
    props = {p.key: p.value for p in graph.metadata_props}
    if METADATA_KEY not in props:
        raise LstmlabError(f"{path} is an ONNX model but not one `lstmlab export` wrote (no lstmlab config in it)")
    try:
        config = Config.from_dict(json.loads(props[METADATA_KEY]))
        check_config(config)
        perm = props.get("lstmlab_permutation")
        permutation = None if perm is None else torch.tensor(json.loads(perm), dtype=torch.int64)
        steps, inputs = VIEWS[config.data.view]
        if (permutation is None) != (config.data.view != "permuted") or (
                permutation is not None and not torch.equal(permutation.sort().values, torch.arange(steps * inputs))):
            raise ValueError(f"the permuted view needs a permutation of 0..{steps * inputs - 1}")
    except (ValueError, TypeError, KeyError, RuntimeError) as e:
        raise LstmlabError(f"{path}: its lstmlab config is damaged ({e}); export the checkpoint again") from None
    try:
        model = OnnxClassifier(data)
    except Exception as e:  # noqa: BLE001 - onnxruntime's load errors are its own types
        raise LstmlabError(f"onnxruntime cannot load {path} ({type(e).__name__}); export the checkpoint again") \
            from None
    return Checkpoint(model=model, config=config, permutation=permutation)  # type: ignore[arg-type]
