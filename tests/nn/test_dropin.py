"""lstmlab.LSTM as a true drop-in for torch.nn.LSTM: PyTorch's own nn.LSTM test samples and error inputs, and the
places real code takes an LSTM (inference mode, empty batches, packed sequences, torch.compile, torch.func,
torch.export, ONNX, checkpointing, autocast, the meta device)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from lstmlab.nn import fused  # noqa: F401 - registers torch.ops.lstmlab.*
from lstmlab.nn.lstm import LSTM

common_modules = pytest.importorskip("torch.testing._internal.common_modules")  # needs `expecttest`

BACKENDS = ["reference", "fused", "torch"]
LSTM_INFO = next(info for info in common_modules.module_db if info.module_cls is nn.LSTM)


def _samples(training: bool) -> list:
    return LSTM_INFO.module_inputs_func(LSTM_INFO, device="cpu", dtype=torch.float64, requires_grad=True,
                                        training=training)


def _twins(kwargs: dict, backend: str, seed: int = 0) -> tuple[nn.LSTM, LSTM]:
    torch.manual_seed(seed)
    ref = nn.LSTM(**kwargs).double()
    ours = LSTM(**kwargs, backend=backend).double()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _flat(result: tuple) -> list[torch.Tensor]:
    out, (h, c) = result
    return [out.data if isinstance(out, PackedSequence) else out, h, c]


def _outputs_and_grads(model: nn.Module, args: tuple) -> list[torch.Tensor]:
    """Outputs, states and the gradients of a loss touching all of them w.r.t. every input and parameter."""
    leaves = [a.detach().clone().requires_grad_(True) if isinstance(a, torch.Tensor) else
              tuple(t.detach().clone().requires_grad_(True) for t in a) for a in args]
    flat_leaves = [t for a in leaves for t in ((a,) if isinstance(a, torch.Tensor) else a)]
    outs = _flat(model(*leaves))
    loss = sum((o * (k + 1.5)).sin().sum() for k, o in enumerate(outs))
    grads = torch.autograd.grad(loss, flat_leaves + list(model.parameters()))
    return outs + list(grads)


def test_module_db_has_every_nn_lstm_sample():
    assert len(_samples(True)) + len(_samples(False)) == 64


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_module_db_samples_equal_nn_lstm(backend: str, training: bool):
    """All of PyTorch's nn.LSTM samples (proj_size, bias, batch_first, both directions, with and without hx):
    outputs, states, input and parameter gradients within 1e-10 in float64."""
    for k, sample in enumerate(_samples(training)):
        kwargs = sample.constructor_input.kwargs
        ref, ours = _twins(kwargs, backend, seed=k)
        ref.train(training)
        ours.train(training)
        got = _outputs_and_grads(ours, sample.forward_input.args)
        want = _outputs_and_grads(ref, sample.forward_input.args)
        for n, (a, b) in enumerate(zip(got, want, strict=True)):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=lambda m, n=n, kw=kwargs: f"{kw} #{n}: {m}")


def test_module_db_samples_gradcheck_and_gradgradcheck():
    """The fused backend's gradients (and gradients of gradients) against finite differences, every sample."""
    for k, sample in enumerate(_samples(True)):
        kwargs = sample.constructor_input.kwargs
        _, ours = _twins(kwargs, "fused", seed=k)
        args = sample.forward_input.args
        x = args[0].detach().clone().requires_grad_(True)
        hx = tuple(t.detach().clone().requires_grad_(True) for t in args[1]) if len(args) > 1 else None
        names = [n for n, _ in ours.named_parameters()]
        params = [p.detach().clone().requires_grad_(True) for p in ours.parameters()]

        def f(x, *flat, hx_given=hx is not None, names=names, model=ours):  # noqa: ANN001, ANN202
            state = (flat[0], flat[1]) if hx_given else None
            weights = dict(zip(names, flat[2:] if hx_given else flat, strict=True))
            return _flat(torch.func.functional_call(model, weights, (x, state)))

        inputs = (x, *(hx or ()), *params)
        assert torch.autograd.gradcheck(lambda *a: f(*a), inputs, eps=1e-6, atol=1e-7, fast_mode=True)
        if k % 4 == 0:  # every variant once; gradgradcheck is the slow one
            assert torch.autograd.gradgradcheck(lambda *a: f(*a), inputs, eps=1e-6, atol=1e-6, fast_mode=True)


def _error_samples() -> list:
    return LSTM_INFO.module_error_inputs_func(LSTM_INFO, device="cpu", dtype=torch.float32, requires_grad=False,
                                              training=True)


@pytest.mark.parametrize("k", range(len(_error_samples())))
def test_module_db_error_inputs_raise_nn_lstms_exception(k: int):
    error = _error_samples()[k]
    sample = error.module_error_input
    cons = sample.constructor_input
    with pytest.raises(error.error_type, match=error.error_regex):
        model = LSTM(*cons.args, **cons.kwargs)
        model(*sample.forward_input.args, **sample.forward_input.kwargs)


def test_is_an_rnn_with_nn_lstms_interface():
    m = LSTM(3, 4, num_layers=2, proj_size=2, bidirectional=True)
    assert isinstance(m, nn.RNNBase) and m.mode == "LSTM"
    assert len(m.all_weights) == 4 and len(m.all_weights[0]) == 5  # w_ih, w_hh, b_ih, b_hh, w_hr
    m.flatten_parameters()
    assert "proj_size=2" in repr(m) and "backend='auto'" in repr(m)
    ref = nn.LSTM(3, 4, num_layers=2, proj_size=2, bidirectional=True)
    m.load_state_dict(ref.state_dict())  # weight_hr_l*: nn.LSTM checkpoints with projections load
    assert set(m.state_dict()) == set(ref.state_dict())


def test_meta_device_and_factory_kwargs():
    m = LSTM(3, 4, device="meta", dtype=torch.float64)
    assert m.weight_ih_l0.device.type == "meta" and m.weight_ih_l0.dtype == torch.float64
    m = m.to_empty(device="cpu")
    m.reset_parameters()
    out, _ = m(torch.randn(5, 2, 3, dtype=torch.float64))
    assert out.shape == (5, 2, 4)


def test_same_initialisation_as_nn_lstm_for_the_same_seed():
    torch.manual_seed(3)
    ref = nn.LSTM(3, 4, 2)
    torch.manual_seed(3)
    ours = LSTM(3, 4, 2)
    for a, b in zip(ref.parameters(), ours.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("enforce_sorted", [True, False])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_packed_sequences(backend: str, enforce_sorted: bool, bidirectional: bool):
    lengths = torch.tensor([7, 5, 5, 2, 1]) if enforce_sorted else torch.tensor([2, 7, 1, 5, 5])
    x = torch.randn(7, 5, 3, dtype=torch.float64)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted)
    D = 2 if bidirectional else 1
    hx = (torch.randn(2 * D, 5, 4, dtype=torch.float64), torch.randn(2 * D, 5, 4, dtype=torch.float64))
    ref, ours = _twins(dict(input_size=3, hidden_size=4, num_layers=2, bidirectional=bidirectional), backend)
    out, _ = ours(packed, hx)
    assert isinstance(out, PackedSequence)
    assert torch.equal(out.batch_sizes, packed.batch_sizes)
    def call(model: nn.Module):  # noqa: ANN202
        def run(data: torch.Tensor, state: tuple) -> tuple:
            return model(PackedSequence(data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices),
                         state)
        return run

    class Wrap(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, data: torch.Tensor, state: tuple) -> tuple:
            return call(self.inner)(data, state)

    got, want = _outputs_and_grads(Wrap(ours), (packed.data, hx)), _outputs_and_grads(Wrap(ref), (packed.data, hx))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_empty_batch(backend: str):
    ref, ours = _twins(dict(input_size=3, hidden_size=4, num_layers=2, bidirectional=True), backend)
    x = torch.randn(6, 0, 3, dtype=torch.float64, requires_grad=True)
    out, (h, c) = ours(x)
    assert out.shape == (6, 0, 8) and h.shape == (4, 0, 4)
    (out.sum() + h.sum() + c.sum()).backward()
    assert x.grad.shape == x.shape
    assert all(p.grad is not None and not p.grad.any() for p in ours.parameters())
    assert ref(x)[0].shape == out.shape


VARIANTS_FOR_EMPTY = [dict(cell="layernorm"), dict(cell="peephole"), dict(zoneout=0.1), dict(recurrent_dropout=0.2),
                      dict(cell="layernorm", zoneout=(0.1, 0.05), recurrent_dropout=0.2)]


@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("variant", VARIANTS_FOR_EMPTY, ids=lambda v: "+".join(f"{k}={v[k]}" for k in v))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_batch_of_every_variant(backend: str, variant: dict, training: bool):
    torch.manual_seed(0)
    m = LSTM(3, 4, num_layers=2, bidirectional=True, backend=backend, dtype=torch.float64, **variant).train(training)
    x = torch.randn(6, 0, 3, dtype=torch.float64, requires_grad=True)
    out, (h, c) = m(x)
    assert out.shape == (6, 0, 8) and h.shape == c.shape == (4, 0, 4)
    (out.sum() + h.sum() + c.sum()).backward()
    assert x.grad.shape == x.shape
    assert all(p.grad is not None and not p.grad.any() for p in m.parameters())


@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_an_empty_sequence_raises_as_nn_lstm(backend: str, batch_first: bool):
    x = torch.randn(5, 0, 3) if batch_first else torch.randn(0, 5, 3)
    for model in (torch.nn.LSTM(3, 4, batch_first=batch_first), LSTM(3, 4, batch_first=batch_first, backend=backend),
                  LSTM(3, 4, batch_first=batch_first, backend=backend, cell="peephole")):
        for inp in (x, torch.randn(0, 3)):
            with pytest.raises(RuntimeError, match="Expected sequence length to be larger than 0"):
                model(inp)


def test_inference_mode_then_no_grad_then_training_in_a_fresh_process():
    code = textwrap.dedent("""
        import torch
        from lstmlab import LSTM
        m = LSTM(3, 8, batch_first=True)
        x = torch.randn(4, 5, 3)
        with torch.inference_mode():
            a = m(x)[0]
        with torch.no_grad():
            b = m(x)[0]
        c = m(x)[0]
        c.sum().backward()
        assert torch.equal(a, b), "inference_mode and no_grad differ"
        # the forward-only loop adds x W_ih^T + b and h W_hh^T apart: the same numbers up to float rounding
        torch.testing.assert_close(b, c.detach(), atol=1e-6, rtol=1e-6)
        assert m.weight_ih_l0.grad is not None
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_activations_are_autograd_saved_tensors_and_checkpointing_drops_them():
    m = LSTM(3, 8, backend="fused")
    x = torch.randn(5, 4, 3, requires_grad=True)
    sizes: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(x)[0].sum().backward()
    assert (5, 4, 32) in sizes  # the gates of every step: saved through autograd, visible to hooks

    grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = torch.utils.checkpoint.checkpoint(m, x, use_reentrant=False)[0]
    assert (5, 4, 32) not in sizes  # checkpointing keeps the inputs only
    out.sum().backward()
    for g, p in zip(grads, m.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_torch_compile_fullgraph_equals_eager(bidirectional: bool):
    torch.manual_seed(0)
    m = LSTM(3, 8, num_layers=2, batch_first=True, bidirectional=bidirectional, backend="fused")
    x = torch.randn(4, 6, 3)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")  # inductor's C++ build adds minutes in CI
    out_c = compiled(x)[0]
    out_c.square().sum().backward()
    grads_c = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    out_e = m(x)[0]
    out_e.square().sum().backward()
    torch.testing.assert_close(out_c, out_e)
    for a, p in zip(grads_c, m.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad)


def test_torch_func_per_sample_gradients_equal_a_loop():
    torch.manual_seed(0)
    m = LSTM(3, 5, batch_first=True, backend="fused").double()
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    params = {k: v.detach() for k, v in m.named_parameters()}

    def loss(p: dict, xi: torch.Tensor) -> torch.Tensor:
        out, (h, c) = torch.func.functional_call(m, p, (xi.unsqueeze(0),))
        return out.square().sum() + h.sum() + c.sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    for i in range(x.shape[0]):
        want = torch.autograd.grad(loss(dict(m.named_parameters()), x[i]), list(m.parameters()))
        for name, w in zip(params, want, strict=True):
            torch.testing.assert_close(per_sample[name][i], w, atol=1e-10, rtol=1e-10)


def test_torch_export_with_a_dynamic_batch_and_backward_through_it():
    torch.manual_seed(0)
    m = LSTM(3, 5, num_layers=2, batch_first=True, backend="fused")
    batch = torch.export.Dim("batch")
    ep = torch.export.export(m, (torch.randn(4, 6, 3),), dynamic_shapes=({0: batch},))
    exported = ep.module()
    x = torch.randn(9, 6, 3, requires_grad=True)
    out, (h, c) = exported(x)
    want, _ = m(x)
    torch.testing.assert_close(out, want)
    out.sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    m(x2)[0].sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_autocast_bfloat16_like_nn_lstm():
    ref, ours = _twins(dict(input_size=3, hidden_size=8, batch_first=True), "fused")
    ref, ours = ref.float(), ours.float()
    x = torch.randn(4, 6, 3)
    with torch.autocast("cpu", torch.bfloat16):
        got, (h, c) = ours(x)
        try:
            want, (h_ref, c_ref) = ref(x)
        except RuntimeError:
            # nn.LSTM's bf16 runs on oneDNN's LSTM kernel, which a CPU without AVX-512 lacks ("could not create a
            # primitive descriptor"): compare the values with its own float32 kernel, ours stays in bf16
            with torch.backends.mkldnn.flags(enabled=False):
                want, (h_ref, c_ref) = ref(x)
            want, h_ref, c_ref = want.to(torch.bfloat16), h_ref.to(torch.bfloat16), c_ref.to(torch.bfloat16)
    assert got.dtype == want.dtype == torch.bfloat16
    assert h.dtype == h_ref.dtype and c.dtype == c_ref.dtype
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)


def test_bad_hx_messages_name_the_mistake():
    m = LSTM(3, 4)
    with pytest.raises(TypeError, match=r"tuple \(h_0, c_0\)"):
        m(torch.randn(5, 2, 3), torch.zeros(1, 2, 4))
    with pytest.raises(RuntimeError, match=r"shaped \(1, 4\) and \(1, 4\).*drop the batch dimension"):
        m(torch.randn(5, 3), (torch.zeros(1, 1, 4), torch.zeros(1, 1, 4)))
    with pytest.raises(RuntimeError, match="Expected hidden"):
        m(torch.randn(5, 2, 3), (torch.zeros(1, 3, 4), torch.zeros(1, 3, 4)))
    with pytest.raises(ValueError, match="dtype"):
        m(torch.randn(5, 2, 3, dtype=torch.float64))


def test_fused_layer_is_a_registered_op_with_a_fake_kernel():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, h, c = torch.empty(7, 3, 2), torch.empty(3, 4), torch.empty(3, 4)
        w_ih, w_hh, b = torch.empty(16, 2), torch.empty(16, 4), torch.empty(16)
        out, h_T, c_T, *_ = torch.ops.lstmlab.lstm_layer(x, h, c, w_ih, w_hh, b, b, None, None, True)
    assert out.shape == (7, 3, 4) and h_T.shape == c_T.shape == (3, 4)
    torch.library.opcheck(torch.ops.lstmlab.lstm_layer.default,
                          (torch.randn(3, 2, 2), torch.randn(2, 4), torch.randn(2, 4), torch.randn(16, 2),
                           torch.randn(16, 4), torch.randn(16), torch.randn(16), None, None, False))
    T, B, H, K = 3, 2, 4, 16  # K: [h | x | 1] padded to 16 columns
    acts, cs, tcs, xh = torch.rand(T, B, 4 * H), torch.rand(T, B, H), torch.rand(T, B, H), torch.randn(T, B, K)
    for op in (torch.ops.lstmlab.lstm_layer_backward.default, torch.ops.lstmlab.lstm_layer_backward_.default):
        torch.library.opcheck(op, (torch.randn(T, B, H), torch.randn(B, H), None, torch.randn(B, H),
                                   torch.randn(16, 2), torch.randn(16, H), None, None, acts.clone(), cs, tcs, xh,
                                   True, True, True, True))


def test_jit_trace_runs_at_other_batch_and_length():
    import warnings

    m = LSTM(3, 5, batch_first=True, bidirectional=True).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nn.LSTM's own shape checks make the tracer warn
        traced = torch.jit.trace(m, (torch.randn(2, 4, 3),), check_trace=False)
    x = torch.randn(6, 11, 3)
    for a, b in zip(_flat(traced(x)), _flat(m(x)), strict=True):
        torch.testing.assert_close(a, b)
