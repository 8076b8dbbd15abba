"""The compiled loops' self-test: before any use, freshly loaded loops are held to the Python loops on tiny cases.

The loader (:mod:`lstmlab.nn._native`) imports nothing above it; ``lstmlab.nn`` hands it this test as a hook
(:mod:`lstmlab.nn._hooks`), and this module imports the loops of both kinds: no import cycle.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lstmlab.nn import _native
from lstmlab.nn.fused.layer import _layer_forward, _variant_backward
from lstmlab.nn.fused.layout import _bias
from lstmlab.nn.fused.native import TRAIN_MAX_BATCH
from lstmlab.nn.fused.plain import _backward_impl
from lstmlab.nn.infer import infer_layer, pack_layer
from lstmlab.nn.masks import zoneout_mask_torch, zoneout_thresholds
from lstmlab.nn.variants import BY_ARG, Arg


def self_test(ops: Any) -> str | None:
    """Hold freshly loaded compiled loops to the Python loops before any use: a tiny forward and backward of the plain
    cell and of two variant mixes, in float32 and float64, and the zoneout mask. None when they agree, else why not
    (one line). Its own generator and no autocast or dispatch modes: it changes nothing the caller sees."""
    from torch.utils._python_dispatch import _disable_current_modes

    gen = torch.Generator().manual_seed(20261207)
    try:
        with _disable_current_modes(), torch.autocast("cpu", enabled=False), torch.inference_mode():
            for dtype in (torch.float32, torch.float64):
                for mix, rows in _SELF_TEST_MIXES:
                    case = _self_test_case(dtype, mix, gen, rows)
                    with _native.forced(ops):
                        got = _self_test_run(*case)
                    with _native.forced(None):
                        want = _self_test_run(*case)
                    tol = 1e-4 if dtype == torch.float32 else 1e-9
                    for name, g, w in zip(("out", "h_T", "c_T", "dx", "dh0", "dc0", "dW_ih", "dW_hh"), got, want,
                                          strict=True):
                        if g.shape != w.shape or not torch.allclose(g, w, rtol=tol, atol=tol):
                            label = "+".join(mix) or "plain"
                            return f"{name} of the {label} cell in {dtype} differs from the Python loops"
                problem = _self_test_infer(ops, dtype, gen) or _self_test_bidir(ops, dtype, gen)
                if problem is not None:
                    return problem
            mask = torch.empty(2, 3, 5, 7)
            ops.zoneout_mask(12345, *zoneout_thresholds(0.25, 0.5), mask)
            if not torch.equal(mask, zoneout_mask_torch(12345, 0.25, 0.5, 3, 5, 7)):
                return "the zoneout mask differs from torch's"
    except Exception as e:  # noqa: BLE001 - any failure is a reason not to use them
        return f"{type(e).__name__}: {_native._first_line(e)}"
    return None


# (variant arguments, batch rows) of the self-test's training calls: the plain cell on both of its training loops
# (lstm_infer.cpp's step loops below TRAIN_MAX_BATCH, lstm_native.cpp's row blocks from it), then two variant mixes.
_SELF_TEST_MIXES: tuple[tuple[tuple[str, ...], int], ...] = (
    ((), 33), ((), TRAIN_MAX_BATCH + 1), (("ln_gates", "peephole"), 33),
    (("ln_cell", "recurrent_mask", "zoneout_mask"), 33),
)


def _self_test_case(dtype: torch.dtype, mix: tuple[str, ...], gen: torch.Generator, B: int) -> tuple:
    """Inputs of one self-test call: T=3 steps, B rows (33: two row blocks on two threads), I=5, H=8."""
    T, n_in, H = 3, 5, 8

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype) * 0.5

    x, h0, c0 = rand(T, B, n_in), rand(B, H), rand(B, H)
    weights = (rand(4 * H, n_in), rand(4 * H, H), rand(4 * H), rand(4 * H))
    variant = {name: _self_test_arg(BY_ARG[name], rand, dtype, T, B, H) for name in mix}
    d_out, d_hT, d_cT = rand(T, B, H), rand(B, H), rand(B, H)
    return x, h0, c0, weights, variant, (d_out, d_hT, d_cT)


def _self_test_infer(ops: Any, dtype: torch.dtype, gen: torch.Generator) -> str | None:
    """The forward-only loop (lstmlab.nn.infer) against the Python loops' forward, on each of its thread layouts
    (the op's own choice, one thread, unit blocks split, rows split) and on a packed batch; None when they agree.
    H=40: several unit blocks, the last one partial, at every vector width."""
    T, B, n_in, H = 3, 33, 5, 40

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype) * 0.5

    x, h0, c0 = rand(T, B, n_in), rand(B, H), rand(B, H)
    w_ih, w_hh, b_ih, b_hh = rand(4 * H, n_in), rand(4 * H, H), rand(4 * H), rand(4 * H)
    tol = 1e-4 if x.dtype == torch.float32 else 1e-9
    packed = torch.tensor([B, B - 5, 2][:T], dtype=torch.int64)
    for sizes in (None, packed):
        with _native.forced(None):
            want = _layer_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, None, sizes, False)[:3]
        for threads, split in ((0, 0), (1, 0), (2, 1), (2, 2)):
            got = infer_layer(ops, x, h0, c0, w_ih, w_hh, b_ih, b_hh, None, sizes, threads, split)
            for name, g, w in zip(("out", "h_T", "c_T"), got, want, strict=True):
                if g.shape != w.shape or not torch.allclose(g, w, rtol=tol, atol=tol):
                    return (f"{name} of the forward-only loop ({threads} threads, split {split}"
                            f"{', packed' if sizes is not None else ''}) in {x.dtype} differs from the Python loops")
    return None


def _self_test_bidir(ops: Any, dtype: torch.dtype, gen: torch.Generator) -> str | None:
    """Both directions in one call (``infer_bidir``, out (T, B, 2H)) against the Python loops run per direction, the
    second one backwards in time; None when they agree. B=13: a full row tile and a partial one."""
    T, B, n_in, H = 3, 13, 5, 40

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype) * 0.5

    x, h0, c0 = rand(T, B, n_in), rand(2, B, H), rand(2, B, H)
    weights = [(rand(4 * H, n_in), rand(4 * H, H), rand(4 * H), rand(4 * H)) for _ in range(2)]
    packed = [pack_layer(ops, w_ih, w_hh, b_ih + b_hh) for w_ih, w_hh, b_ih, b_hh in weights]
    got = ops.infer_bidir(x, h0, c0, [p[0] for p in packed], [p[1] for p in packed], [p[2] for p in packed])
    with _native.forced(None):
        fwd = _layer_forward(x, h0[0], c0[0], *weights[0], None, None, False)[:3]
        rev = _layer_forward(x.flip(0), h0[1], c0[1], *weights[1], None, None, False)[:3]
    want = (torch.cat([fwd[0], rev[0].flip(0)], 2), torch.stack([fwd[1], rev[1]]), torch.stack([fwd[2], rev[2]]))
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    for name, g, w in zip(("out", "h_T", "c_T"), got, want, strict=True):
        if g.shape != w.shape or not torch.allclose(g, w, rtol=tol, atol=tol):
            return f"{name} of the bidirectional forward-only loop in {dtype} differs from the Python loops"
    return None


def _self_test_run(x: Tensor, h0: Tensor, c0: Tensor, weights: tuple, variant: dict, grads: tuple) -> list[Tensor]:
    w_ih, w_hh, b_ih, b_hh = weights
    out, h_T, c_T, acts, cs, tcs, xh, extra = _layer_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, None, None, True,
                                                             variant)
    if variant:
        g = _variant_backward(*grads, x, c0, w_ih, w_hh, _bias(b_ih, b_hh), None, acts, cs, tcs, xh, extra, variant,
                              True, True, True)
    else:
        g = _backward_impl(*grads, c0, w_ih, w_hh, None, None, acts, cs, tcs, xh, True, True, True, True,
                           inplace=False)
    return [out, h_T, c_T, *g[:5]]


def _self_test_arg(arg: Arg, rand: Callable[..., Tensor], dtype: torch.dtype, T: int, B: int, H: int) -> Tensor:
    """A variant argument for the self-test: learned ones near their initial values, masks of 0s and 2s (dropout)
    or 0s and 1s (per step)."""
    if arg.params:
        count, rows = arg.shape
        init = torch.tensor([[p.init] for p in arg.params], dtype=dtype)
        return rand(count, rows * H) + init
    if arg.per == "row":
        return (rand(B, H) > 0).to(dtype) * 2
    return (rand(2, T, B, H) > 0.3).to(dtype)
