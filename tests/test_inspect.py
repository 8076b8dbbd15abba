"""``lstmlab.inspect.record``: the recorded gates are the model's own computation, on every backend."""

from __future__ import annotations

import pytest
import torch

from lstmlab.config import ModelConfig
from lstmlab.errors import LstmlabError
from lstmlab.inspect import GATE_NAMES, record
from lstmlab.model import SequenceClassifier
from lstmlab.nn.lstm import _layer_backends

BACKENDS = ["reference", "torch", "fused"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny step-by-step ops gain nothing from threads, and OpenMP spinning on a shared machine costs 100x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(backend: str, layers: int, bidirectional: bool, seed: int = 0) -> SequenceClassifier:
    if backend != "torch" and backend not in _layer_backends():
        pytest.skip(f"backend {backend} is not built in this installation")
    torch.manual_seed(seed)
    cfg = ModelConfig(input_size=5, hidden_size=7, num_layers=layers, num_classes=4,
                      bidirectional=bidirectional, forget_bias=1.0, backend=backend)
    return SequenceClassifier(cfg).eval()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_record_matches_model(backend: str, layers: int, bidirectional: bool) -> None:
    model = _model(backend, layers, bidirectional)
    x = torch.randn(3, 9, 5)
    rec = record(model, x)
    out, (h_n, c_n) = model.lstm(x)  # the model's own backend
    d = 2 if bidirectional else 1
    assert len(rec.layers) == layers * d
    for k, r in enumerate(rec.layers):
        assert (r.layer, r.direction) == (k // d, k % d)
        for name in GATE_NAMES:
            assert r[name].shape == (3, 9, 7)
        torch.testing.assert_close(r.final_h, h_n[k], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(r.final_c, c_n[k], atol=1e-5, rtol=1e-5)
    last = torch.cat([r.h for r in rec.layers[-d:]], dim=2)  # (B, T, D*H)
    torch.testing.assert_close(last, out, atol=1e-5, rtol=1e-5)
    # Gates are consistent with the recorded states: c_t = f c_{t-1} + i g, h_t = o tanh(c_t).
    for r in rec.layers:
        c_prev = torch.cat([torch.zeros(3, 1, 7), r.c[:, :-1]], 1) if r.direction == 0 else \
            torch.cat([r.c[:, 1:], torch.zeros(3, 1, 7)], 1)
        torch.testing.assert_close(r.c, r.f * c_prev + r.i * r.g, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(r.h, r.o * torch.tanh(r.c), atol=1e-6, rtol=1e-6)
        assert 0 <= r.i.min() and r.i.max() <= 1 and 0 <= r.f.min() and r.f.max() <= 1
    expected = torch.softmax(model(x), dim=1)
    torch.testing.assert_close(torch.softmax(rec.logits, 1), expected, atol=1e-5, rtol=1e-5)
    assert rec.probs is not None and rec.probs.shape == (3, 9, 4)
    torch.testing.assert_close(rec.probs[:, -1], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rec.probs.sum(-1), torch.ones(3, 9), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_per_step_probs_are_prefix_predictions(bidirectional: bool) -> None:
    """probs[:, t] is the model's prediction on the sequence cut after step t, by definition."""
    model = _model("torch", 2, bidirectional, seed=3)
    x = torch.randn(2, 6, 5)
    rec = record(model, x)
    for t in range(6):
        torch.testing.assert_close(rec.probs[:, t], torch.softmax(model(x[:, : t + 1]), 1), atol=1e-5, rtol=1e-5)


def test_reverse_direction_is_aligned_with_input_position() -> None:
    model = _model("reference", 1, True)
    x = torch.randn(1, 5, 5)
    rev = record(model, x).get(0, 1)
    x2 = x.clone()
    x2[:, 0] += 1.0  # changing the first input changes the reverse direction only at t = 0
    rev2 = record(model, x2).get(0, 1)
    torch.testing.assert_close(rev.h[:, 1:], rev2.h[:, 1:])
    assert not torch.allclose(rev.h[:, 0], rev2.h[:, 0])


def test_long_bidirectional_sequences_skip_per_step_probs() -> None:
    model = _model("reference", 1, True)
    x = torch.randn(1, 12, 5)
    rec = record(model, x, max_prefix_steps=8)
    assert rec.probs is None and "O(T^2)" in rec.probs_note
    torch.testing.assert_close(rec.logits, model(x), atol=1e-5, rtol=1e-5)  # the whole-sequence output still is


def test_record_uses_eval_semantics_and_leaves_model_alone() -> None:
    torch.manual_seed(1)
    model = SequenceClassifier(ModelConfig(input_size=5, hidden_size=7, num_layers=2, num_classes=4, dropout=0.5,
                                           backend="reference"))
    model.train()
    x = torch.randn(2, 4, 5)
    rec = record(model, x)
    assert model.training  # recording did not switch modes
    model.eval()
    torch.testing.assert_close(torch.softmax(rec.logits, 1), torch.softmax(model(x), 1), atol=1e-5, rtol=1e-5)


def test_bad_input_and_layer_are_one_line_errors() -> None:
    model = _model("reference", 1, False)
    with pytest.raises(LstmlabError, match=r"expected input of shape \(B, T, 5\)"):
        record(model, torch.randn(2, 4, 3))
    rec = record(model, torch.randn(1, 3, 5))
    with pytest.raises(LstmlabError, match="has 1 layer"):
        rec.get(layer=1)
    with pytest.raises(LstmlabError, match="bidirectional"):
        rec.get(direction=1)
