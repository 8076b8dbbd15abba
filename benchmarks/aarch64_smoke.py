"""The checks of benchmarks/aarch64_smoke.sh, run by the emulated aarch64 Python (any machine runs them too).

``LSTMLAB_NATIVE=0``: the fused backend on its Python loops; ``LSTMLAB_NATIVE=1``: on the compiled loops, which
must then be loaded (a silent fallback to the Python loops is a FAIL). Each case compares the fused backend's
outputs, final states and every gradient (input, initial states, parameters) with ``torch.nn.LSTM`` holding the
same weights (plain cell) and with lstmlab's gate-level ``reference`` backend: in float32 within atol = rtol =
1e-5, and in float64 (fused vs reference) within 1e-10. The LayerNorm cell in float32 is held, as in
tests/nn/test_variants.py, to the reference's own accuracy (its backward multiplies by 1/std, so any two fp32
orders of operations land apart by more than 1e-5): each tensor's error from the float64 result (relative to
1 + |x|) at most 10 x (the fp32 reference's error + 3e-5). One PASS/FAIL line per comparison; exit 1 on a FAIL.
"""

from __future__ import annotations

import os
import platform
import sys
import time

T0 = time.perf_counter()
TOL = {"float32": 1e-5, "float64": 1e-10}


def stamp(what: str, since: float) -> float:
    now = time.perf_counter()
    print(f"time  {what}: {now - since:.1f} s", flush=True)
    return now


def main() -> int:
    import torch
    from torch import nn

    import lstmlab
    from lstmlab.nn import _native

    t = stamp("import torch + lstmlab", T0)
    mode = os.environ.get("LSTMLAB_NATIVE", "auto")
    print(f"info  machine={platform.machine()} python={platform.python_version()} torch={torch.__version__} "
          f"lstmlab={lstmlab.__version__} ({os.path.dirname(lstmlab.__file__)}) LSTMLAB_NATIVE={mode} "
          f"threads={torch.get_num_threads()}", flush=True)
    print(f"info  {torch.__config__.show().splitlines()[1].strip()}; "
          f"cuda={torch.version.cuda} mkldnn={torch.backends.mkldnn.is_available()}", flush=True)
    failures = 0

    ops = _native.get()  # LSTMLAB_NATIVE=1: builds in the foreground if needed; on failure warns and gives None
    if mode == "1":
        if ops is None:
            print("FAIL  native loops: not loaded (see the warning above); the checks below would run the Python "
                  "loops, so they are skipped", flush=True)
            return 1
        print(f"PASS  native loops loaded from {_native.library_path()}", flush=True)
        t = stamp("load (or build) the native loops", t)
    elif ops is not None:
        print("FAIL  LSTMLAB_NATIVE=0 but the native loops are loaded", flush=True)
        return 1
    loops = "native loops" if ops is not None else "Python loops"

    def report(label: str, n: int, worst: float, bad: list[str]) -> None:
        nonlocal failures
        failures += bool(bad)
        print(f"{'FAIL' if bad else 'PASS'}  {label}: {n} tensors, {worst:.2e}" + ("" if not bad else
              "; " + "; ".join(bad[:4])), flush=True)

    def compare(label: str, got: dict, want: dict, tol: float) -> None:
        worst, bad = 0.0, []
        for name, a in got.items():
            b = want[name]
            if a is None or b is None:
                if (a is None) != (b is None):
                    bad.append(f"{name}: None vs tensor")
                continue
            diff = (a - b).abs().max().item() if a.numel() else 0.0
            worst = max(worst, diff)
            try:
                torch.testing.assert_close(a, b, atol=tol, rtol=tol)
            except AssertionError as e:
                bad.append(f"{name}: {str(e).splitlines()[0]} (max |diff| {diff:.2e})")
        report(f"{label} (atol=rtol={tol:g}): max |diff|", len(got), worst, bad)

    def as_accurate(label: str, got: dict, want: dict, truth: dict, factor: float = 10, floor: float = 3e-5) -> None:
        worst, bad = 0.0, []
        for name, t in truth.items():
            if t is None or not t.numel():
                continue
            scale = 1 + t.abs()
            err_fused = ((got[name].double() - t).abs() / scale).max().item()
            err_ref = ((want[name].double() - t).abs() / scale).max().item()
            worst = max(worst, err_fused / (err_ref + floor))
            if err_fused > factor * (err_ref + floor):
                bad.append(f"{name}: fused {err_fused:.2e} from fp64, reference {err_ref:.2e}")
        report(f"{label} (error from fp64 <= {factor:g} x (reference's + {floor:g})): max ratio", len(truth), worst,
               bad)

    def run(model: nn.Module, x: torch.Tensor, hx: tuple[torch.Tensor, torch.Tensor], w: torch.Tensor) -> dict:
        x = x.clone().requires_grad_()
        hx = tuple(s.clone().requires_grad_() for s in hx)
        model.zero_grad(set_to_none=True)
        out, (h, c) = model(x, hx)
        (out * w).sum().add(h.square().sum()).add(c.sin().sum()).backward()
        res = {"output": out.detach(), "h_n": h.detach(), "c_n": c.detach(), "grad x": x.grad, "grad h0": hx[0].grad,
               "grad c0": hx[1].grad}
        res.update({f"grad {n}": p.grad for n, p in model.named_parameters()})
        return res

    n_in, H, L, T, B = 8, 16, 2, 7, 4
    cases = [
        ("plain", dict()),
        ("plain bidirectional batch_first", dict(bidirectional=True, batch_first=True)),
        ("layernorm", dict(cell="layernorm")),
        ("peephole", dict(cell="peephole")),
    ]
    for name, kw in cases:
        torch.manual_seed(0)
        fused = lstmlab.LSTM(n_in, H, L, backend="fused", **kw)
        with torch.no_grad():  # move the variants' parameters off their neutral init (ones / zeros)
            for p in fused.parameters():
                p.add_(0.1 * torch.randn_like(p))
        reference = lstmlab.LSTM(n_in, H, L, backend="reference", **kw)
        reference.load_state_dict(fused.state_dict())
        d = 2 if kw.get("bidirectional") else 1
        x = torch.randn((B, T, n_in) if kw.get("batch_first") else (T, B, n_in))
        hx = (torch.randn(L * d, B, H), torch.randn(L * d, B, H))
        w = torch.randn((B, T, d * H) if kw.get("batch_first") else (T, B, d * H))
        got, want = run(fused, x, hx, w), run(reference, x, hx, w)
        if kw.get("cell") == "layernorm":
            truth = run(reference.double(), x.double(), tuple(s.double() for s in hx), w.double())
            as_accurate(f"{name} fp32: fused ({loops}) vs reference backend", got, want, truth)
        else:
            compare(f"{name} fp32: fused ({loops}) vs reference backend", got, want, TOL["float32"])
        if "cell" not in kw:
            torch_lstm = nn.LSTM(n_in, H, L, batch_first=kw.get("batch_first", False),
                                 bidirectional=kw.get("bidirectional", False))
            torch_lstm.load_state_dict(fused.state_dict())
            compare(f"{name} fp32: fused ({loops}) vs torch.nn.LSTM", got, run(torch_lstm, x, hx, w), TOL["float32"])
        fused.double()
        reference.double()
        x, hx, w = x.double(), tuple(s.double() for s in hx), w.double()
        compare(f"{name} fp64: fused ({loops}) vs reference backend", run(fused, x, hx, w), run(reference, x, hx, w),
                TOL["float64"])
        t = stamp(f"{name}: forward+backward x{4 if 'cell' in kw else 5}", t)

    stamp("total in Python", T0)
    print(f"{'FAIL' if failures else 'PASS'}  {loops}: {failures} failed comparison(s)", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
