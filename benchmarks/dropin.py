"""Training-step throughput of lstmlab.LSTM where nn.LSTM users take it: packed sequences, proj_size, and
torch.compile of the classifier; each against torch.nn.LSTM timed in the same process, turns interleaved.

    python benchmarks/dropin.py                  # all three, B=256, H=128, T=28, I=28
    python benchmarks/dropin.py --only packed --repeats 9

packed:  lengths uniform in 1..T (seeded), pack_padded_sequence(enforce_sorted=False), loss on every output.
proj:    proj_size=64 (nn.LSTM's projection; lstmlab's fused backend runs it in its Python step loops).
compile: SequenceClassifier + cross-entropy + backward + SGD: torch.compile(model) vs eager fused vs nn.LSTM.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence


def _time(steps: dict[str, Callable[[], None]], batch: int, repeats: int, per_round: int) -> dict[str, float]:
    """Median samples/s of each step, rounds interleaved so that outside load hits all of them alike."""
    for step in steps.values():
        step()
        step()
    rates: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            for _ in range(per_round):
                steps[name]()
            rates[name].append(per_round * batch / (time.perf_counter() - start))
    return {name: statistics.median(v) for name, v in rates.items()}


def _lstm_step(model: nn.Module, make_input: Callable[[], object]) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    inp = make_input()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out, (h, _) = model(inp)
        data = out.data if hasattr(out, "batch_sizes") else out
        (data.square().mean() + h.square().mean()).backward()
        opt.step()

    return step


def _pair(kwargs: dict) -> tuple[nn.Module, nn.Module]:
    from lstmlab import LSTM

    torch.manual_seed(0)
    ref = nn.LSTM(**kwargs)
    ours = LSTM(**kwargs, backend="fused")
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def bench_packed(B: int, T: int, I: int, H: int, repeats: int) -> dict[str, float]:  # noqa: E741
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T, B, I, generator=gen)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    ref, ours = _pair(dict(input_size=I, hidden_size=H))
    steps = {"nn.LSTM": _lstm_step(ref, lambda: packed), "lstmlab fused": _lstm_step(ours, lambda: packed)}
    return _time(steps, B, repeats, per_round=max(1, 2048 // B))


def bench_proj(B: int, T: int, I: int, H: int, P: int, repeats: int) -> dict[str, float]:  # noqa: E741
    x = torch.randn(T, B, I, generator=torch.Generator().manual_seed(0))
    ref, ours = _pair(dict(input_size=I, hidden_size=H, proj_size=P))
    steps = {"nn.LSTM": _lstm_step(ref, lambda: x), "lstmlab fused": _lstm_step(ours, lambda: x)}
    return _time(steps, B, repeats, per_round=max(1, 2048 // B))


def bench_compile(B: int, T: int, I: int, H: int, repeats: int) -> dict[str, float]:  # noqa: E741
    from lstmlab.config import ModelConfig
    from lstmlab.model import SequenceClassifier

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, I, generator=gen)
    y = torch.randint(0, 10, (B,), generator=gen)

    def classifier_step(backend: str, compiled: bool) -> Callable[[], None]:
        torch.manual_seed(0)
        model = SequenceClassifier(ModelConfig(input_size=I, hidden_size=H, backend=backend))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        run = torch.compile(model) if compiled else model

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(run(x), y).backward()
            opt.step()

        return step

    steps = {"nn.LSTM (eager)": classifier_step("torch", False),
             "lstmlab fused (eager)": classifier_step("fused", False),
             "lstmlab fused, torch.compile": classifier_step("fused", True)}
    return _time(steps, B, repeats, per_round=max(1, 2048 // B))


def _print(title: str, rates: dict[str, float]) -> None:
    base = next(iter(rates.values()))
    print(title)
    for name, rate in rates.items():
        print(f"  {name:30s} {rate:9.0f} samples/s  {rate / base:5.2f}x")


def main(argv: list[str] | None = None) -> int:
    """Run the chosen benchmarks and print samples/s with the ratio to nn.LSTM."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["packed", "proj", "compile"], nargs="*", help="which (default: all)")
    parser.add_argument("--batch-size", type=int, default=256, help="B (default 256)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per contender (median reported)")
    args = parser.parse_args(argv)
    from lstmlab.nn import _native

    _native.build()  # time the compiled loops, not the Python ones a first run uses while they build
    only = args.only or ["packed", "proj", "compile"]
    B, T, I, H = args.batch_size, 28, 28, 128  # noqa: E741
    print(f"T={T} I={I} H={H} B={B} threads={torch.get_num_threads()}; training steps, median of {args.repeats}")
    if "packed" in only:
        _print("packed sequences, lengths uniform in 1..T:", bench_packed(B, T, I, H, args.repeats))
    if "proj" in only:
        _print("proj_size=64:", bench_proj(B, T, I, H, 64, args.repeats))
    if "compile" in only:
        _print("classifier training step:", bench_compile(B, T, I, H, args.repeats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
