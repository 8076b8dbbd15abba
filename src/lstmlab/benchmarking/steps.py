"""One timed step per backend: a training step (forward + cross-entropy + backward + SGD) or an inference on its own
copy of the same initial weights, on lstmlab's backends, nn.LSTM, or a serving runtime (int8 dynamic quantisation,
onnxruntime). torch is imported on first use."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from lstmlab.benchmarking.settings import INFERENCE_MODES, PLAIN, SERVING
from lstmlab.errors import LstmlabError


def make_step(mode: str, backend: str, batch: int, seq_len: int, input_size: int, hidden_size: int,
             layers: int, device: Any, seed: int, variant: tuple[str, Any, float] = PLAIN,
             bidirectional: bool = False) -> Callable[[], Any]:
    """A closure running one step of `mode` on its own model (same initial weights for every backend; a variant's
    extra parameters start at their init: LayerNorm gains 1, peepholes 0). Inference steps return the logits."""
    import torch
    import torch.nn.functional as F

    from lstmlab.config import ModelConfig
    from lstmlab.model import SequenceClassifier

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    cell, zoneout, recurrent_dropout = variant
    config = ModelConfig(input_size=input_size, hidden_size=hidden_size, num_layers=layers,
                         backend="torch" if backend in SERVING else backend, bidirectional=bidirectional,
                         cell=cell, zoneout=list(zoneout) if isinstance(zoneout, tuple) else zoneout,
                         recurrent_dropout=recurrent_dropout)
    model = SequenceClassifier(config).to(device)
    x = torch.randn(batch, seq_len, input_size, generator=gen).to(device)  # (B, T, I)
    y = torch.randint(0, config.num_classes, (batch,), generator=gen).to(device)
    if mode in INFERENCE_MODES:
        model.eval()
        if backend in SERVING:
            return _serving_step(backend, model, x)
        grad_off = torch.inference_mode if mode == "infer" else torch.no_grad

        def forward_step() -> Any:
            with grad_off():
                return model(x)

        return forward_step
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()

    return train_step


def _plain_classifier(model: Any) -> Any:
    """The classifier on torch's own nn.LSTM and nn.Linear (same weights): what ``quantize_dynamic`` maps, as it
    matches module types exactly (lstmlab.LSTM is a subclass)."""
    import torch
    from torch import nn

    src, directions = model.lstm, 2 if model.config.bidirectional else 1

    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(src.input_size, src.hidden_size, num_layers=src.num_layers, batch_first=True,
                                bidirectional=src.bidirectional)
            self.lstm.load_state_dict(src.state_dict())
            self.head = model.head

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            _, (h_n, _) = self.lstm(x)  # (L*D, B, H)
            return self.head(h_n[-directions:].transpose(0, 1).reshape(x.size(0), -1))

    return Plain().eval()


def _serving_step(backend: str, model: Any, x: Any) -> Callable[[], Any]:
    """Inference of ``model``'s weights on a serving runtime: int8 dynamic quantisation (LSTM and head) under
    inference_mode, or onnxruntime on the graph ``lstmlab export`` writes (as many threads as torch, no spinning)."""
    import torch

    if backend == "int8":
        from torch.ao.quantization import quantize_dynamic

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's deprecation notice of quantized tensors: not the user's concern
            quantized = quantize_dynamic(_plain_classifier(model), {torch.nn.LSTM, torch.nn.Linear},
                                         dtype=torch.qint8)

        def int8_step() -> Any:
            with torch.inference_mode():
                return quantized(x)

        return int8_step
    try:
        import onnxruntime as ort

        from lstmlab.onnxfile import onnx_graph
    except ImportError:
        raise LstmlabError("--backends onnxruntime needs onnx and onnxruntime: pip install 'lstmlab[export]'") \
            from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    # its threads would spin after each run and slow whichever backend is timed next (the turns rotate)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(onnx_graph(model, x.shape[1], x.shape[2]).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    feed = {"x": x.float().numpy()}

    def onnx_step() -> Any:
        return torch.from_numpy(session.run(["logits"], feed)[0])

    return onnx_step


