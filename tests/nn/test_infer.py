"""The forward-only path (lstmlab.nn.infer, csrc/lstm_infer.cpp) and the training path against nn.LSTM on every
shape of ``lstmlab bench --grid`` (few steps: the shapes' B, I, H, layers and directions, T cut to 4), its weight
cache and its fallback when the op fails. No timing assertions (the bench's inference and serving rows are tested in
tests/benchmarking and tests/commands/test_bench.py)."""

from __future__ import annotations

import functools

import pytest
import torch
from loops import using
from torch import nn

from lstmlab import LSTM
from lstmlab.benchmarking import GRID
from lstmlab.nn import _native, fused, infer, selftest
from lstmlab.nn.fused import plain

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
SHORT_T = 4
# (B, I, H, layers, bidirectional) of every grid row, once each
SHAPES = sorted({(row[1], *row[3:]) for row in GRID})


def _pair(I: int, H: int, layers: int, bidirectional: bool, dtype: torch.dtype) -> tuple[LSTM, nn.LSTM]:  # noqa: E741
    torch.manual_seed(0)
    ours = LSTM(I, H, num_layers=layers, bidirectional=bidirectional, batch_first=True, backend="fused").to(dtype)
    theirs = nn.LSTM(I, H, num_layers=layers, bidirectional=bidirectional, batch_first=True).to(dtype)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _assert_close(got: list[torch.Tensor], want: list[torch.Tensor], tol: float) -> None:
    for k, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=lambda m, k=k: f"tensor #{k}: {m}")


@pytest.mark.parametrize("split", [0, 1, 2], ids=["auto", "units", "rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-I{}-H{}-L{}-{}".format(*s[:4], "bi" if s[4] else "uni"))
def test_inference_equals_nn_lstm_on_the_grid(native_ops, shape: tuple, dtype: torch.dtype, split: int,  # noqa: ANN001
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """eval() under inference_mode: out, h_n, c_n as nn.LSTM's, on the compiled forward-only loop with the threads
    split as it decides, over unit blocks, and over rows (x's projection then inside each step)."""
    if split:
        monkeypatch.setattr(plain, "infer_layer", functools.partial(infer.infer_layer, split=split))
    B, I, H, layers, bidirectional = shape  # noqa: E741
    ours, theirs = _pair(I, H, layers, bidirectional, dtype)
    x = torch.randn(B, SHORT_T, I, dtype=dtype)
    with torch.inference_mode(), using(native_ops):
        out, (h, c) = ours.eval()(x)
        want, (wh, wc) = theirs.eval()(x)
    _assert_close([out, h, c], [want, wh, wc], TOL[dtype])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-I{}-H{}-L{}-{}".format(*s[:4], "bi" if s[4] else "uni"))
def test_training_step_equals_nn_lstm_on_the_grid(native_ops, shape: tuple) -> None:  # noqa: ANN001
    """Forward and backward of the training path (float64, compiled loops): outputs and every gradient."""
    B, I, H, layers, bidirectional = shape  # noqa: E741
    ours, theirs = _pair(I, H, layers, bidirectional, torch.float64)
    x = torch.randn(B, SHORT_T, I, dtype=torch.float64)
    results = []
    for model in (ours, theirs):
        with using(native_ops):
            out, (h, c) = model(x)
            loss = out.square().sum() + h.sum() + 2 * c.sum()
            grads = torch.autograd.grad(loss, list(model.parameters()))
        results.append([out, h, c, *grads])
    _assert_close(*results, TOL[torch.float64])


@pytest.mark.parametrize("loops", ["small-batch", "row-blocks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(5, 7, 40, 2, True), (16, 64, 256, 1, False), (1, 5, 17, 1, False)],
                         ids=lambda s: "B{}-I{}-H{}-L{}-{}".format(*s[:4], "bi" if s[4] else "uni"))
def test_training_on_either_step_loops_equals_nn_lstm(native_ops, shape: tuple, dtype: torch.dtype, loops: str,  # noqa: ANN001
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The training path below TRAIN_MAX_BATCH (lstm_infer.cpp's train_forward/train_backward) and above it
    (lstm_native.cpp's row blocks): outputs and the gradients of x, (h_0, c_0) and every parameter, from a given
    state, H=40 and 17 leaving a partial block at every vector width."""
    monkeypatch.setattr(fused.native, "TRAIN_MAX_BATCH", 1 << 30 if loops == "small-batch" else 0)
    B, I, H, layers, bidirectional = shape  # noqa: E741
    ours, theirs = _pair(I, H, layers, bidirectional, dtype)
    states = layers * (2 if bidirectional else 1)
    x = torch.randn(B, SHORT_T, I, dtype=dtype, requires_grad=True)
    h0 = torch.randn(states, B, H, dtype=dtype, requires_grad=True)
    c0 = torch.randn(states, B, H, dtype=dtype, requires_grad=True)
    results = []
    for model in (ours, theirs):
        with using(native_ops):
            out, (h, c) = model(x, (h0, c0))
            loss = out.sin().sum() + h.square().sum() + 2 * c.sum()
            grads = torch.autograd.grad(loss, [x, h0, c0, *model.parameters()])
        results.append([out, h, c, *grads])
    _assert_close(*results, 1e-4 if dtype == torch.float32 else TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bidirectional_inference_runs_both_directions_in_one_call(native_ops, dtype: torch.dtype,  # noqa: ANN001
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain bidirectional layer in inference runs on lstmlab_native::infer_bidir, and equals nn.LSTM from a given
    state (H=40: a partial block)."""
    calls = []
    real = fused.bidirectional_layer

    def spy(*args):  # noqa: ANN002, ANN202
        got = real(*args)
        calls.append(got is not None)
        return got

    monkeypatch.setattr("lstmlab.nn.lstm.bidirectional_layer", spy)
    ours, theirs = _pair(7, 40, 2, True, dtype)
    x = torch.randn(3, 6, 7, dtype=dtype)
    hx = (torch.randn(4, 3, 40, dtype=dtype), torch.randn(4, 3, 40, dtype=dtype))
    with torch.inference_mode(), using(native_ops):
        out, (h, c) = ours.eval()(x, hx)
        want, (wh, wc) = theirs.eval()(x, hx)
    _assert_close([out, h, c], [want, wh, wc], TOL[dtype])
    assert calls == [True, True]  # one call per layer


def test_packed_and_reused_weights_follow_the_parameters(native_ops) -> None:  # noqa: ANN001
    """A packed batch, then an in-place update of the weights: the cached packed weights are not reused stale."""
    ours, theirs = _pair(5, 40, 2, True, torch.float32)
    lengths = torch.tensor([7, 5, 5, 2])
    x = torch.randn(4, 7, 5)
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True)
    for _ in range(2):
        with torch.no_grad(), using(native_ops):
            out, (h, c) = ours(packed)
            want, (wh, wc) = theirs(packed)
        _assert_close([out.data, h, c], [want.data, wh, wc], TOL[torch.float32])
        with torch.no_grad():
            for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
                a.mul_(1.5)
                b.mul_(1.5)


@pytest.mark.parametrize("optimizer", ["adam-fused", "sgd-fused", "adam"])
def test_an_optimizer_step_between_evaluations_is_seen(native_ops, optimizer: str,  # noqa: ANN001
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Evaluate, step, evaluate (what training does every eval_every steps): fused optimizers write the parameters
    without bumping their version counter, and the second evaluation must still read the new weights."""
    ours, theirs = _pair(6, 16, 1, False, torch.float32)
    kind, _, fused_ = optimizer.partition("-")
    make = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[kind]
    step = make(ours.parameters(), lr=0.1, **({"fused": True} if fused_ else {}))
    x = torch.randn(12, 5, 6)
    for _ in range(3):
        theirs.load_state_dict(ours.state_dict())
        with torch.inference_mode(), using(native_ops):
            got, want = ours.eval()(x)[0], theirs.eval()(x)[0]
        _assert_close([got], [want], TOL[torch.float32])
        ours.train()
        with using(native_ops):
            ours(x)[0].square().sum().backward()
        step.step()
        step.zero_grad()


class _Broken:
    """The compiled ops, but the forward-only one raises or returns wrong numbers ("wrong"; "wrong-bidir": only
    the bidirectional one, in its backward direction)."""

    def __init__(self, ops, mode: str) -> None:  # noqa: ANN001
        self._ops, self._mode = ops, mode

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self._ops, name)

    def infer(self, *args):  # noqa: ANN002, ANN202
        if self._mode == "raise":
            raise RuntimeError("lstmlab_native.infer: broken on purpose")
        out, h, c = self._ops.infer(*args)
        return (out + 1 if self._mode == "wrong" else out), h, c

    def infer_bidir(self, *args):  # noqa: ANN002, ANN202
        out, h, c = self._ops.infer_bidir(*args)
        if self._mode == "wrong-bidir":
            out = out.clone()
            out[:, :, out.shape[2] // 2 :] += 1e-3
        return out, h, c


def test_a_failing_infer_op_falls_back_with_one_line(native_ops, monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """An error from the op: one warning line (the loader's), the call recomputed on the Python loops."""
    loader = _native._Loader()
    monkeypatch.setattr(_native, "_loader", lambda: loader)
    loader.ops = _Broken(native_ops, "raise")
    ours, theirs = _pair(3, 8, 1, False, torch.float32)
    x = torch.randn(2, 5, 3)
    with torch.inference_mode():
        out, _ = ours(x)
        again, _ = ours(x)
        want, _ = theirs(x)
    _assert_close([out, again], [want, want], TOL[torch.float32])
    err = capsys.readouterr().err
    assert err.count("lstmlab: warning:") == 1 and "the forward" in err and "broken on purpose" in err
    assert loader.disabled and _native.get() is None


def test_the_self_test_covers_the_infer_op(native_ops) -> None:  # noqa: ANN001
    assert selftest.self_test(native_ops) is None
    problem = selftest.self_test(_Broken(native_ops, "wrong"))
    assert problem is not None and "forward-only loop" in problem
    problem = selftest.self_test(_Broken(native_ops, "wrong-bidir"))
    assert problem is not None and "bidirectional forward-only loop" in problem


def test_packed_weights_go_with_their_model(native_ops) -> None:  # noqa: ANN001
    infer.release_packed_weights()
    ours, _ = _pair(3, 8, 1, False, torch.float32)
    with torch.no_grad(), using(native_ops):
        ours(torch.randn(2, 3, 3))
    assert len(infer._PACKED._entries) == 1
    del ours
    assert len(infer._PACKED._entries) == 0
