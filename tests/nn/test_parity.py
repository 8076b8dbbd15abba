"""lstmlab's LSTM and LSTMCell against torch.nn.LSTM / nn.LSTMCell with the same weights:
outputs, final states and every gradient, in fp32 and fp64."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lstmlab import LSTM, LSTMCell, ModelConfig, SequenceClassifier
from lstmlab.nn.lstm import _layer_backends

BACKENDS = [*_layer_backends(), "torch"]
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-10, rtol=1e-10)}


def _pair(input_size, hidden, layers, bidirectional, batch_first, bias, backend, dtype):
    ours = LSTM(input_size, hidden, layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional,
                backend=backend).to(dtype)
    ref = nn.LSTM(input_size, hidden, layers, bias=bias, batch_first=batch_first,
                  bidirectional=bidirectional).to(dtype)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def _check(ours, ref, x, hx, dtype):
    tol = TOL[dtype]
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    hx1 = hx2 = None
    if hx is not None:
        hx1 = tuple(s.clone().requires_grad_() for s in hx)
        hx2 = tuple(s.clone().requires_grad_() for s in hx)
    out1, (h1, c1) = ours(x1, hx1)
    out2, (h2, c2) = ref(x2, hx2)
    torch.testing.assert_close(out1, out2, **tol)
    torch.testing.assert_close(h1, h2, **tol)
    torch.testing.assert_close(c1, c2, **tol)
    # A loss touching every output so that every gradient path is exercised.
    w = torch.randn_like(out1)
    ((out1 * w).sum() + h1.square().sum() + c1.sin().sum()).backward()
    ((out2 * w).sum() + h2.square().sum() + c2.sin().sum()).backward()
    torch.testing.assert_close(x1.grad, x2.grad, **tol)
    if hx is not None:
        for a, b in zip(hx1, hx2, strict=True):
            torch.testing.assert_close(a.grad, b.grad, **tol)
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[name].grad, **tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@settings(max_examples=12, deadline=None)
@given(
    batch=st.integers(1, 5),
    seq=st.integers(1, 7),
    input_size=st.integers(1, 6),
    hidden=st.integers(1, 9),
    layers=st.integers(1, 3),
    bidirectional=st.booleans(),
    batch_first=st.booleans(),
    bias=st.booleans(),
    with_state=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_lstm_matches_nn_lstm(backend, dtype, batch, seq, input_size, hidden, layers, bidirectional,
                              batch_first, bias, with_state, seed):
    torch.manual_seed(seed)
    ours, ref = _pair(input_size, hidden, layers, bidirectional, batch_first, bias, backend, dtype)
    shape = (batch, seq, input_size) if batch_first else (seq, batch, input_size)
    x = torch.randn(shape, dtype=dtype)
    hx = None
    if with_state:
        states = layers * (2 if bidirectional else 1)
        hx = (torch.randn(states, batch, hidden, dtype=dtype), torch.randn(states, batch, hidden, dtype=dtype))
    _check(ours, ref, x, hx, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mnist_shape_and_unbatched(backend):
    torch.manual_seed(0)
    ours, ref = _pair(28, 128, 2, False, True, True, backend, torch.float32)
    _check(ours, ref, torch.randn(3, 28, 28), None, torch.float32)
    x = torch.randn(28, 28)  # unbatched (T, I): nn.LSTM accepts it, so must we
    torch.testing.assert_close(ours(x)[0], ref(x)[0], atol=1e-5, rtol=1e-5)


def test_weights_load_both_ways():
    torch.manual_seed(1)
    ours = LSTM(4, 6, 2, bidirectional=True)
    ref = nn.LSTM(4, 6, 2, bidirectional=True)
    assert list(ours.state_dict()) == list(ref.state_dict())
    for a, b in zip(ours.state_dict().values(), ref.state_dict().values(), strict=True):
        assert a.shape == b.shape
    ours.load_state_dict(ref.state_dict())  # nn.LSTM -> lstmlab
    x = torch.randn(5, 2, 4)
    torch.testing.assert_close(ours(x)[0], ref(x)[0], atol=1e-6, rtol=1e-6)
    torch.manual_seed(2)
    ours2 = LSTM(4, 6, 2, bidirectional=True)
    ref.load_state_dict(ours2.state_dict())  # lstmlab -> nn.LSTM
    torch.testing.assert_close(ours2(x)[0], ref(x)[0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch", [1, 4])
def test_cell_matches_nn_lstmcell(dtype, bias, batch):
    torch.manual_seed(3)
    ours = LSTMCell(5, 7, bias=bias).to(dtype)
    ref = nn.LSTMCell(5, 7, bias=bias).to(dtype)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(batch, 5, dtype=dtype)
    state = (torch.randn(batch, 7, dtype=dtype), torch.randn(batch, 7, dtype=dtype))
    for s in (None, state):
        h1, c1 = ours(x, s)
        h2, c2 = ref(x, s)
        assert h1.shape == (batch, 7)  # a batch of one keeps its batch dimension
        torch.testing.assert_close(h1, h2, **TOL[dtype])
        torch.testing.assert_close(c1, c2, **TOL[dtype])
        (h1.sum() + c1.sum()).backward()
        (h2.sum() + c2.sum()).backward()
        for (name, p), q in zip(ours.named_parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, **TOL[dtype], msg=name)
        ours.zero_grad()
        ref.zero_grad()
    h, c = ours(torch.randn(5, dtype=dtype))  # unbatched sample
    assert h.shape == c.shape == (7,)


def test_init_range_and_forget_bias():
    lstm = LSTM(3, 16, forget_bias=1.0)
    bound = 16**-0.5
    assert lstm.weight_hh_l0.abs().max() <= bound
    f_slice = lstm.bias_ih_l0[16:32]
    assert (f_slice >= 1 - bound).all() and (f_slice <= 1 + bound).all()
    assert lstm.bias_ih_l0[:16].abs().max() <= bound


def test_classifier_stacks_layers_and_batch_of_one():
    one = SequenceClassifier(ModelConfig(num_layers=1))
    three = SequenceClassifier(ModelConfig(num_layers=3))
    assert sum(p.numel() for p in three.parameters()) > sum(p.numel() for p in one.parameters())
    assert "weight_ih_l2" in dict(three.lstm.named_parameters())
    assert three(torch.randn(1, 28, 28)).shape == (1, 10)  # the textbook's squeeze() broke this
    bi = SequenceClassifier(ModelConfig(bidirectional=True, num_layers=2))
    assert bi(torch.randn(2, 28, 28)).shape == (2, 10)
    assert bi.head.in_features == 256


def test_classifier_uses_last_step_of_both_directions():
    torch.manual_seed(4)
    model = SequenceClassifier(ModelConfig(input_size=3, hidden_size=5, bidirectional=True))
    x = torch.randn(2, 6, 3)
    out, _ = model.lstm(x)  # (B, T, 2H)
    features = torch.cat([out[:, -1, :5], out[:, 0, 5:]], dim=1)
    torch.testing.assert_close(model(x), model.head(features))


def test_bad_arguments():
    """nn.LSTM's own checks, with nn.LSTM's exception types (lstmlab.LSTM is an nn.LSTM)."""
    with pytest.raises(ValueError, match="greater than zero"):
        LSTM(0, 4)
    with pytest.raises(ValueError, match="dropout"):
        LSTM(3, 4, dropout=1.5)
    with pytest.raises(ValueError, match="backend"):
        LSTM(3, 4, backend="nope")
    with pytest.raises(RuntimeError, match="input_size"):
        LSTM(3, 4)(torch.randn(2, 2, 5))
