"""The fused backend equals the gate-level reference and nn.LSTM: outputs, final states and every gradient,
through both its Python step loops and (when a compiler is at hand) its compiled ones."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from loops import using

from lstmlab.nn import fused
from lstmlab.nn.lstm import LSTM

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def run_lstm(model: LSTM, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None,
             weights: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """Outputs, final states and the gradients of a loss touching all three w.r.t. inputs and parameters."""
    x = x.detach().clone().requires_grad_(True)
    leaves = [x]
    if state is not None:
        state = tuple(s.detach().clone().requires_grad_(True) for s in state)
        leaves += list(state)
    out, (h_n, c_n) = model(x, state)
    loss = (out * weights[0]).sum() + (h_n * weights[1]).sum() + (c_n * weights[2]).sum()
    grads = torch.autograd.grad(loss, leaves + list(model.parameters()))
    return [out, h_n, c_n, *grads]


def assert_all_close(got: list[torch.Tensor], want: list[torch.Tensor], tol: float) -> None:
    assert len(got) == len(want)
    for k, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=lambda m, k=k: f"tensor #{k}: {m}")


def make_case(T: int, B: int, I: int, H: int, layers: int, bidirectional: bool, batch_first: bool,  # noqa: E741
              with_state: bool, bias: bool, dtype: torch.dtype, seed: int):
    """A model on the reference backend, an input, an optional initial state and loss weights."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = LSTM(I, H, layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional,
                 backend="reference").to(dtype)
    shape = (B, T, I) if batch_first else (T, B, I)
    x = torch.randn(shape, generator=gen, dtype=dtype)
    D = 2 if bidirectional else 1
    state = None
    if with_state:
        state = (torch.randn(layers * D, B, H, generator=gen, dtype=dtype),
                 torch.randn(layers * D, B, H, generator=gen, dtype=dtype))
    out_shape = (B, T, D * H) if batch_first else (T, B, D * H)
    weights = (torch.randn(out_shape, generator=gen, dtype=dtype),
               torch.randn(layers * D, B, H, generator=gen, dtype=dtype),
               torch.randn(layers * D, B, H, generator=gen, dtype=dtype))
    return model, x, state, weights


cases = st.fixed_dictionaries({
    "T": st.integers(1, 6),
    "B": st.integers(1, 4),
    "I": st.integers(1, 5),
    "H": st.integers(1, 6),
    "layers": st.integers(1, 3),
    "bidirectional": st.booleans(),
    "batch_first": st.booleans(),
    "with_state": st.booleans(),
    "bias": st.booleans(),
    "dtype": st.sampled_from([torch.float32, torch.float64]),
    "seed": st.integers(0, 2**16),
})


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases)
def test_fused_matches_reference(loops, case: dict) -> None:  # noqa: ANN001
    model, x, state, weights = make_case(**case)
    want = run_lstm(model, x, state, weights)
    model.backend = "fused"
    with using(loops):
        got = run_lstm(model, x, state, weights)
    assert_all_close(got, want, TOL[case["dtype"]])


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases)
def test_fused_matches_nn_lstm(loops, case: dict) -> None:  # noqa: ANN001
    model, x, state, weights = make_case(**case)
    torch_lstm = torch.nn.LSTM(model.input_size, model.hidden_size, model.num_layers, bias=model.bias,
                               batch_first=model.batch_first, bidirectional=model.bidirectional).to(case["dtype"])
    torch_lstm.load_state_dict(model.state_dict())
    want = run_lstm(torch_lstm, x, state, weights)
    model.backend = "fused"
    with using(loops):
        got = run_lstm(model, x, state, weights)
    assert_all_close(got, want, TOL[case["dtype"]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_layer_direct_all_gradients(loops, dtype: torch.dtype) -> None:  # noqa: ANN001
    """fused_layer itself against reference_layer, at a size where the loops' SIMD paths run."""
    from lstmlab.nn.lstm import reference_layer

    gen = torch.Generator().manual_seed(3)
    T, B, I, H = 7, 5, 9, 20  # noqa: E741
    args = [torch.randn(T, B, I, generator=gen, dtype=dtype), torch.randn(B, H, generator=gen, dtype=dtype),
            torch.randn(B, H, generator=gen, dtype=dtype), torch.randn(4 * H, I, generator=gen, dtype=dtype) * 0.3,
            torch.randn(4 * H, H, generator=gen, dtype=dtype) * 0.3, torch.randn(4 * H, generator=gen, dtype=dtype),
            torch.randn(4 * H, generator=gen, dtype=dtype)]
    args[0] = args[0] * 3  # saturate some gates: exercises the clamped exp
    results = []
    for fn in (reference_layer, fused.fused_layer):
        leaves = [a.clone().requires_grad_(True) for a in args]
        with using(loops):
            out, h, c = fn(*leaves)
        loss = (out.sin()).sum() + (h * 2).sum() + (c * 3).sum()
        results.append([out, h, c, *torch.autograd.grad(loss, leaves)])
    assert_all_close(results[1], results[0], TOL[dtype])


def test_gradcheck_fp64(loops) -> None:  # noqa: ANN001
    gen = torch.Generator().manual_seed(0)
    T, B, I, H = 3, 2, 3, 2  # noqa: E741
    shapes = [(T, B, I), (B, H), (B, H), (4 * H, I), (4 * H, H), (4 * H,), (4 * H,)]
    args = [torch.randn(s, generator=gen, dtype=torch.float64, requires_grad=True) for s in shapes]
    with using(loops):
        assert torch.autograd.gradcheck(fused.fused_layer, args, eps=1e-6, atol=1e-8)


def test_single_step_single_sample_and_inference(loops) -> None:  # noqa: ANN001
    """B=1, T=1, and the no-grad path (no saved state) give the reference's numbers."""
    model, x, _, _ = make_case(1, 1, 3, 4, 2, True, False, False, True, torch.float32, 1)
    with torch.no_grad():
        want_out, (want_h, want_c) = model(x)
        model.backend = "fused"
        with using(loops):
            out, (h, c) = model(x)
    assert_all_close([out, h, c], [want_out, want_h, want_c], 1e-5)


def test_retain_graph_and_interleaved_graphs(loops) -> None:  # noqa: ANN001
    """Backward twice through a kept graph, and two live graphs, must not see each other's scratch buffers."""
    model, x, state, weights = make_case(5, 3, 4, 6, 1, False, False, True, True, torch.float64, 2)
    want = run_lstm(model, x, state, weights)
    model.backend = "fused"
    with using(loops):
        xa = x.clone().requires_grad_(True)
        xb = (x * 0.5).requires_grad_(True)
        out_a, _ = model(xa, state)
        out_b, _ = model(xb, state)  # a second graph alive while the first is differentiated
        loss_a = (out_a * weights[0]).sum()
        (g1,) = torch.autograd.grad(loss_a, xa, retain_graph=True)
        (g2,) = torch.autograd.grad(loss_a, xa)
        (gb,) = torch.autograd.grad((out_b * weights[0]).sum(), xb)
    torch.testing.assert_close(g1, g2, atol=0, rtol=0)
    model.backend = "reference"
    ref_a = torch.autograd.grad((model(x.clone().requires_grad_(True), state)[0] * weights[0]).sum(),
                                model.parameters())  # sanity: reference runs too
    assert len(ref_a) == 4
    xr = (x * 0.5).requires_grad_(True)
    (gb_ref,) = torch.autograd.grad((model(xr, state)[0] * weights[0]).sum(), xr)
    torch.testing.assert_close(gb, gb_ref, atol=1e-10, rtol=1e-10)
    assert want[0].shape == out_a.shape


def test_double_backward_is_exact(loops) -> None:  # noqa: ANN001
    """A gradient penalty (create_graph=True, then backward through |dL/dx|^2) gives nn.LSTM's weight gradients."""
    model, x, state, _ = make_case(4, 3, 3, 5, 2, True, False, True, True, torch.float64, 4)
    ref = torch.nn.LSTM(3, 5, 2, bidirectional=True).double()
    ref.load_state_dict(model.state_dict())
    model.backend = "fused"

    def penalty_grads(m: torch.nn.Module) -> list[torch.Tensor]:
        xi = x.clone().requires_grad_(True)
        out, (h, c) = m(xi, state)
        (g,) = torch.autograd.grad((out * out).sum() + h.sum() + c.sum(), xi, create_graph=True)
        return [g, *torch.autograd.grad((g * g).sum(), list(m.parameters()))]

    with using(loops):
        got = penalty_grads(model)
    assert_all_close(got, penalty_grads(ref), 1e-10)


def test_gradgradcheck_fp64(loops) -> None:  # noqa: ANN001
    gen = torch.Generator().manual_seed(1)
    T, B, I, H = 3, 2, 2, 2  # noqa: E741
    shapes = [(T, B, I), (B, H), (B, H), (4 * H, I), (4 * H, H), (4 * H,), (4 * H,)]
    args = [torch.randn(s, generator=gen, dtype=torch.float64, requires_grad=True) for s in shapes]
    with using(loops):
        assert torch.autograd.gradgradcheck(fused.fused_layer, args, eps=1e-6, atol=1e-7)


def test_native_and_python_loops_agree(native_ops) -> None:  # noqa: ANN001
    """The two loop implementations are interchangeable: same numbers up to float rounding."""
    model, x, state, weights = make_case(9, 17, 5, 33, 2, True, True, True, True, torch.float32, 5)
    model.backend = "fused"
    with using(None):
        py = run_lstm(model, x, state, weights)
    with using(native_ops):
        nat = run_lstm(model, x, state, weights)
    assert_all_close(nat, py, 1e-5)


@pytest.mark.parametrize("variant", [{}, {"cell": "layernorm", "zoneout": 0.1, "recurrent_dropout": 0.2}])
def test_onednn_and_aten_matmuls_agree(native_ops, monkeypatch: pytest.MonkeyPatch, variant: dict) -> None:  # noqa: ANN001
    """The compiled loops' float32 matmuls on oneDNN (csrc/lstm_gemm.h) or, with LSTMLAB_ONEDNN=0, on at::mm: the
    same numbers up to float rounding; the library says which one it runs."""
    plain, x, state, weights = make_case(9, 40, 5, 33, 2, True, True, True, True, torch.float32, 6)
    model = LSTM(5, 33, 2, batch_first=True, bidirectional=True, backend="fused", **variant)
    model.load_state_dict(plain.state_dict(), strict=False)
    model.eval()  # zoneout's expectation, no dropout masks: both runs compute the same function
    results = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("LSTMLAB_ONEDNN", flag)
        results[flag] = native_ops.gemm()
        with using(native_ops):
            results[flag, "run"] = run_lstm(model, x, state, weights)
    assert results["0"] == "at::mm"
    monkeypatch.delenv("LSTMLAB_ONEDNN")
    # As torch's own ops, it follows the user's switch (flags(): torch's test utilities, once imported, refuse
    # plain assignment to it).
    with torch.backends.mkldnn.flags(enabled=False):
        assert native_ops.gemm() == "at::mm"
    assert results["1"] in ("onednn", "at::mm")  # at::mm where this torch has no oneDNN
    assert_all_close(results["1", "run"], results["0", "run"], 1e-4 if variant else 1e-5)


def test_native_can_be_switched_off(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # noqa: ANN001
    from lstmlab.nn import _native

    monkeypatch.setenv("LSTMLAB_CACHE_DIR", str(tmp_path))
    assert _native.library_path().is_relative_to(tmp_path)
    monkeypatch.setenv("LSTMLAB_NATIVE", "0")
    loader = _native._Loader()
    assert loader.get() is None
    assert not any(tmp_path.iterdir())  # nothing was built or started


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match="expected x"):
        fused.fused_layer(torch.zeros(2, 3), torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(16, 2),
                          torch.zeros(16, 4), None, None)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_row_blocks(native_ops, threads: int, dtype: torch.dtype) -> None:  # noqa: ANN001
    """Batches big enough to be cut into per-thread row blocks (uneven ones too) give the reference's numbers."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model, x, state, weights = make_case(4, 149, 3, 8, 2, False, True, True, True, dtype, 6)
        want = run_lstm(model, x, state, weights)
        model.backend = "fused"
        with using(native_ops):
            got = run_lstm(model, x, state, weights)
    finally:
        torch.set_num_threads(before)
    assert_all_close(got, want, TOL[dtype])


class _Intercept(torch.overrides.TorchFunctionMode):
    """A do-nothing function mode: like any tool that intercepts ops, it must see the registered op."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("variant", [False, True])
def test_eager_shortcut_equals_the_registered_op(loops, variant: bool) -> None:  # noqa: ANN001
    """Plain eager calls skip torch.library's Python wrappers; the numbers are the registered op's, bit for bit,
    and anything that intercepts ops still sees ``lstmlab::lstm_layer`` and its backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    torch.manual_seed(0)
    model = LSTM(5, 8, 2, bidirectional=True, backend="fused", cell="peephole" if variant else "lstm").double()
    x = torch.randn(7, 3, 5, dtype=torch.float64)
    weights = (torch.randn(7, 3, 16, dtype=torch.float64), torch.randn(4, 3, 8, dtype=torch.float64),
               torch.randn(4, 3, 8, dtype=torch.float64))
    with using(loops):
        eager = run_lstm(model, x, None, weights)
        with _Intercept():
            through_op = run_lstm(model, x, None, weights)
    for a, b in zip(eager, through_op, strict=True):
        assert torch.equal(a, b)

    seen: list[str] = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with using(loops), Log():
        run_lstm(model, x, None, weights)
    assert any(name.startswith("lstmlab.lstm_layer.") for name in seen)
    assert any(name.startswith(("lstmlab.lstm_layer_backward", "lstmlab.lstm_variant_layer_backward"))
               for name in seen)


def test_buffer_cache_over_its_budget_drops_free_buffers_of_any_size() -> None:
    """Past max_bytes the cache lets go of its least recently used free buffers (it used to crash comparing
    buffers of different sizes with ==, in a permuted-pixel training run at T=784), never one still in use."""
    cache = fused._BufferCache(max_bytes=1 << 20, min_bytes=0)
    like = torch.empty(0)
    held = cache.empty((64, 1024), like)  # 256 KiB, kept alive by the caller
    for n in (96, 128, 160, 200):  # free buffers of other sizes, together past the 1 MiB budget
        buf = cache.empty((n, 1024), like)
        buf.fill_(1.0)
        del buf
    sizes = [b.numel() for b in cache._bufs]
    assert sum(sizes) * 4 <= (1 << 20) + 200 * 1024 * 4  # back within the budget, bar the newest
    assert 64 * 1024 in sizes  # the one in use stayed
    held.fill_(2.0)
    again = cache.empty((200, 1024), like)  # a free buffer of that size is handed out again
    assert again.untyped_storage().data_ptr() in [b.untyped_storage().data_ptr() for b in cache._bufs]
    assert again.untyped_storage().data_ptr() != held.untyped_storage().data_ptr()
