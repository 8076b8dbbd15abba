"""``lstmlab bench``: samples/s of each LSTM backend against ``torch.nn.LSTM``, measured in the same run.

A training step is what ``lstmlab train`` does per batch: the LSTM of a ``SequenceClassifier`` (batch
first) + linear head on the last hidden state + cross-entropy + backward + SGD step, on random data. Every
backend gets its own copy of the same initial weights. The backends are timed in turns (A B C, B C A, ...)
so that a burst of load from other processes hits them all alike; the table gives the median of the
repeats and its ratio to ``torch`` (PyTorch's own LSTM kernel, oneDNN on CPU, cuDNN on GPU).

A variant (``--cell``, ``--zoneout``, ``--recurrent-dropout``, or ``--variants`` for each of :data:`VARIANTS`) runs
on the reference and fused backends; its ``torch`` row is plain ``nn.LSTM`` (which has no variants), timed in
turns with them, so "x torch" is always the ratio to plain nn.LSTM, and "x ref" the ratio to the same variant
on the reference backend.

``--mode infer`` times a model as it is served: ``model.eval()`` under ``torch.inference_mode()``. ``--grid`` times
a fixed grid of shapes (:data:`GRID`: inference from B=1, H up to 512, T up to 500, 2 layers, bidirectional, and
training steps), one table row per shape, each in its own interleaved rounds. The serving backends ``int8``
(``torch.ao.nn.quantized.dynamic.LSTM`` and Linear, int8 weights) and ``onnxruntime`` (the graph ``lstmlab export``
writes) run inference modes only, next to the same weights on nn.LSTM.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lstmlab.config.schema import zoneout_arg
from lstmlab.errors import LstmlabError
from lstmlab.files import atomic_write_text

BACKENDS = ("reference", "fused", "torch")
SERVING = ("int8", "onnxruntime")  # what a CPU server would run instead: inference modes only
MODES = ("train", "forward", "infer")
INFERENCE_MODES = ("forward", "infer")
# --grid: (mode, B, T, I, H, layers, bidirectional); issue 27's table, plus B=1 at H=512 with 2 bidirectional layers
GRID: tuple[tuple[str, int, int, int, int, int, bool], ...] = (
    ("infer", 1, 100, 40, 256, 2, False),
    ("infer", 1, 500, 16, 128, 1, False),
    ("infer", 1, 100, 64, 512, 2, True),
    ("infer", 8, 100, 64, 512, 1, False),
    ("infer", 64, 50, 128, 256, 2, True),
    ("infer", 256, 28, 28, 128, 1, False),
    ("train", 16, 50, 64, 256, 1, False),
    ("train", 64, 100, 32, 256, 2, False),
    ("train", 128, 50, 128, 512, 1, False),
    ("train", 32, 200, 16, 128, 1, True),
    ("train", 256, 28, 28, 128, 1, False),
)
GRID_BACKENDS = ("fused", "torch")
NAMES = {"fused": "lstmlab", "torch": "nn.LSTM", "reference": "reference", "int8": "int8 dynamic",
         "onnxruntime": "onnxruntime"}
CELLS = ("lstm", "peephole", "layernorm")  # lstmlab.nn.cell.CELLS, without importing torch for --help
# --variants: (cell, zoneout, recurrent_dropout) of each variant alone, then two combinations of them
VARIANTS: tuple[tuple[str, float | tuple[float, float], float], ...] = (
    ("layernorm", 0.0, 0.0),
    ("peephole", 0.0, 0.0),
    ("lstm", (0.1, 0.05), 0.0),
    ("lstm", 0.0, 0.25),
    ("layernorm", (0.1, 0.05), 0.25),
    ("peephole", (0.1, 0.05), 0.25),
)
PLAIN = ("lstm", 0.0, 0.0)
ALLOCATORS = ("default", "warm")


def _device_name(name: str) -> str:
    """``auto`` -> cuda when torch sees a GPU, else cpu (as every lstmlab command reads --device)."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"



def variant_label(cell: str, zoneout: float | Sequence[float], recurrent_dropout: float) -> str:
    """A variant's name in the table (no spaces): ``lstm``, ``layernorm``, ``zoneout=0.1,0.05``,
    ``peephole+zoneout=0.1+rdrop=0.25``..."""
    parts = [] if cell == "lstm" else [cell]
    pair = tuple(zoneout) if isinstance(zoneout, (tuple, list)) else (zoneout, zoneout)
    if any(pair):
        parts.append(f"zoneout={pair[0]:g}" if pair[0] == pair[1] else f"zoneout={pair[0]:g},{pair[1]:g}")
    if recurrent_dropout:
        parts.append(f"rdrop={recurrent_dropout:g}")
    return "+".join(parts) or "lstm"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``lstmlab bench``."""
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256, 1024], metavar="B",
                        help="batch sizes to time (default: 64 256 1024)")
    parser.add_argument("--seq-len", type=int, default=28, help="time steps T (28 rows; 784 for pixel MNIST)")
    parser.add_argument("--input-size", type=int, default=28, help="features per step I (28 rows; 1 pixels)")
    parser.add_argument("--hidden-size", type=int, default=128, help="hidden units H (default 128)")
    parser.add_argument("--layers", type=int, default=1, help="stacked LSTM layers (default 1)")
    parser.add_argument("--bidirectional", action="store_true", help="a bidirectional LSTM")
    parser.add_argument("--backends", nargs="+", default=None, metavar="NAME",
                        help=f"backends to time, any of {', '.join(BACKENDS + SERVING)} (default: "
                             f"{' '.join(BACKENDS)}; with --grid: {' '.join(GRID_BACKENDS)}); 'torch' is nn.LSTM's "
                             "kernel and the reference of the ratio column; int8 (torch's dynamic quantisation) "
                             "and onnxruntime (the graph `lstmlab export` writes) time inference only")
    parser.add_argument("--mode", choices=("train", "forward", "infer", "both"), default="train",
                        help="train: forward+backward+SGD step; forward: eval() under no_grad; infer: eval() under "
                             "inference_mode, as a served model; both: train and forward (default train)")
    parser.add_argument("--grid", action="store_true",
                        help="time the built-in grid of shapes (inference from B=1 to 256, H up to 512, T up to "
                             "500, 2 layers, bidirectional; training steps) instead of --batch-sizes, --seq-len, "
                             "--input-size, --hidden-size, --layers, --bidirectional and --mode")
    parser.add_argument("--min-seconds", type=float, default=None,
                        help="seconds per timed round at least (default: 0.25 with --grid, else no minimum)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per backend (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per backend first")
    parser.add_argument("--min-samples", type=int, default=2048,
                        help="samples per timed round at least (more steps per round at small batches)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto = cuda when available, else cpu")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: elapsed time (default); cpu: this process's CPU time, steadier on a machine "
                             "shared with other jobs when --threads 1")
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                        help="write the rows as JSON to PATH (or stdout instead of the table without PATH) "
                        "(default: the table only)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and data")
    parser.add_argument("--allocator", choices=ALLOCATORS, default="default",
                        help="default: glibc malloc as it comes; warm: keep freed big blocks in the heap "
                             "(mallopt), as jemalloc or tcmalloc would, so that no backend pays fresh "
                             "page faults for its large temporaries every step (default: default)")
    g = parser.add_argument_group("LSTM variants (reference and fused backends; the torch rows stay plain nn.LSTM)")
    g.add_argument("--cell", choices=CELLS, default="lstm",
                   help="the cell: lstm, peephole or layernorm (default: lstm)")
    g.add_argument("--zoneout", type=zoneout_arg, default=0.0, metavar="Z",
                   help="zoneout probability, or Z_C,Z_H for the cell and the hidden state (default: 0)")
    g.add_argument("--recurrent-dropout", type=float, default=0.0, metavar="P",
                   help="recurrent dropout, one mask per sequence (default: 0)")
    g.add_argument("--variants", action="store_true",
                   help="time each of: " + ", ".join(variant_label(*v) for v in VARIANTS)
                   + " (instead of the one --cell/--zoneout/--recurrent-dropout give)")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark and print the table (or JSON)."""
    from lstmlab.files import check_writable

    if args.json not in (None, "-"):
        check_writable(args.json, "--json")  # before the minutes of timing, not after
    if args.variants and (args.cell != "lstm" or args.zoneout or args.recurrent_dropout):
        raise LstmlabError("--variants times its own list; leave out --cell, --zoneout and --recurrent-dropout")
    variants = list(VARIANTS) if args.variants else [(args.cell, args.zoneout, args.recurrent_dropout)]
    if args.grid:
        if args.variants or args.cell != "lstm" or args.zoneout or args.recurrent_dropout:
            raise LstmlabError("--grid times the plain cell; leave out --variants, --cell, --zoneout and "
                               "--recurrent-dropout")
        rows = grid_benchmark(backends=args.backends or list(GRID_BACKENDS), repeats=args.repeats,
                              warmup=args.warmup, min_seconds=0.25 if args.min_seconds is None else args.min_seconds,
                              threads=args.threads, seed=args.seed, clock=args.clock, allocator=args.allocator)
        return _emit(args, rows, format_grid)
    rows = benchmark(
        batch_sizes=args.batch_sizes,
        seq_len=args.seq_len,
        input_size=args.input_size,
        hidden_size=args.hidden_size,
        layers=args.layers,
        backends=args.backends or list(BACKENDS),
        mode=args.mode,
        repeats=args.repeats,
        warmup=args.warmup,
        min_samples=args.min_samples,
        threads=args.threads,
        device=_device_name(args.device),
        seed=args.seed,
        clock=args.clock,
        variants=variants,
        allocator=args.allocator,
        bidirectional=args.bidirectional,
        min_seconds=args.min_seconds or 0.0,
    )
    return _emit(args, rows, format_table)


def _emit(args: argparse.Namespace, rows: list[dict[str, Any]], table: Callable[[list[dict[str, Any]]], str]) -> int:
    """Print the rows as a table (or JSON to stdout), and write them to --json PATH."""
    from lstmlab.files import os_error

    if args.json == "-":
        print(json.dumps(rows, indent=2))
        return 0
    print(table(rows))
    if args.json:
        try:
            atomic_write_text(Path(args.json), json.dumps(rows, indent=2) + "\n")
        except LstmlabError:  # already one line (files words its own OS errors)
            raise
        except OSError as e:
            raise os_error(e, args.json, "write") from None
    return 0


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise LstmlabError(message)


def benchmark(
    batch_sizes: Sequence[int] = (64, 256, 1024),
    seq_len: int = 28,
    input_size: int = 28,
    hidden_size: int = 128,
    layers: int = 1,
    backends: Sequence[str] = BACKENDS,
    mode: str = "train",
    repeats: int = 5,
    warmup: int = 2,
    min_samples: int = 2048,
    threads: int | None = None,
    device: str = "cpu",
    seed: int = 0,
    clock: str = "wall",
    variants: Sequence[tuple[str, float | Sequence[float], float]] = (PLAIN,),
    allocator: str = "default",
    bidirectional: bool = False,
    min_seconds: float = 0.0,
) -> list[dict[str, Any]]:
    """Time each backend; one row per (mode, variant, batch size, backend) with samples/s, ratios and peak memory.
    ``variants`` are (cell, zoneout, recurrent_dropout) triples; the torch backend always runs plain nn.LSTM. A
    timed round runs at least ``min_samples`` samples and ``min_seconds`` seconds.

    Raises ``LstmlabError`` on bad arguments (non-positive sizes, unknown backend, missing CUDA, bad variant).
    """
    import torch

    from lstmlab.nn.cell import check_variant

    _check(len(batch_sizes) > 0 and all(b > 0 for b in batch_sizes),
           f"--batch-sizes must be positive integers, got {list(batch_sizes)}")
    for name, value in (("--seq-len", seq_len), ("--input-size", input_size), ("--hidden-size", hidden_size),
                        ("--layers", layers), ("--repeats", repeats), ("--min-samples", min_samples)):
        _check(value > 0, f"{name} must be a positive integer, got {value}")
    _check(warmup >= 0, f"--warmup must be >= 0, got {warmup}")
    _check(threads is None or threads > 0, f"--threads must be a positive integer, got {threads}")
    unknown = [b for b in backends if b not in BACKENDS + SERVING]
    _check(not unknown and len(backends) > 0,
           f"unknown backend(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(BACKENDS + SERVING)}")
    _check(mode in (*MODES, "both"), f"--mode must be train, forward, infer or both, got {mode!r}")
    serving = [b for b in backends if b in SERVING]
    _check(not serving or mode in INFERENCE_MODES,
           f"{', '.join(serving)} time inference only: use --mode infer or forward")
    _check(not serving or device == "cpu", f"{', '.join(serving)}: CPU only here; use --device cpu")
    _check(min_seconds >= 0, f"--min-seconds must be >= 0, got {min_seconds}")
    _check(clock in ("wall", "cpu"), f"--clock must be wall or cpu, got {clock!r}")
    _check(clock == "wall" or device == "cpu", "--clock cpu measures CPU work; use it with --device cpu")
    _check(len(variants) > 0, "no variant to time")
    _check(allocator in ALLOCATORS, f"--allocator must be one of {', '.join(ALLOCATORS)}, got {allocator!r}")
    for cell, zoneout, recurrent_dropout in variants:
        try:
            check_variant(cell, tuple(zoneout) if isinstance(zoneout, list) else zoneout, recurrent_dropout)
        except ValueError as e:  # worded for the module's keywords; the flags carry the same names
            raise LstmlabError(f"--cell/--zoneout/--recurrent-dropout: {e}") from None
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise LstmlabError(f"--device {device!r} is not a device torch knows ({e}); use cpu or cuda") from e
    _check(dev.type != "cuda" or torch.cuda.is_available(), "--device cuda: no CUDA GPU is available here; use cpu")
    loops = None
    if "fused" in backends:
        from lstmlab.nn.lstm import _layer_backends

        _check("fused" in _layer_backends(), "the fused backend is not available in this installation")
        loops = _prepare_native() if dev.type == "cpu" else "python"
    if allocator == "warm":
        _warm_allocator()
    if threads is not None:
        torch.set_num_threads(threads)

    backends = list(dict.fromkeys(backends))  # drop repeats, keep order
    modes = ["train", "forward"] if mode == "both" else [mode]
    rows: list[dict[str, Any]] = []
    for m in modes:
        for variant in variants:
            for batch in batch_sizes:
                rows.extend(_bench_one(m, batch, seq_len, input_size, hidden_size, layers, backends, repeats,
                                       warmup, min_samples, dev, seed, clock, variant, bidirectional, min_seconds))
    from lstmlab.machine import summary

    for row in rows:
        row["fused_loops"] = loops
        row["allocator"] = allocator
        row["machine"] = summary()
    return rows


def _prepare_native() -> str:
    """Make the fused backend's compiled loops ready before timing (a benchmark may wait for the one-off
    build; training never does). Returns which loops the fused rows time: "python", or "native, float32 matmuls on
    onednn" (or "at::mm", see csrc/lstm_gemm.h)."""
    import sys

    from lstmlab.nn import _native

    if os.environ.get("LSTMLAB_NATIVE", "auto").strip().lower() in ("0", "off", "false", "no"):
        return "python"
    if _native.get() is None and not _native.library_path().exists():
        print("lstmlab bench: compiling the fused backend's C++ loops once (about a minute)...", file=sys.stderr)
        try:
            _native.build()
        except Exception as e:  # noqa: BLE001 - no compiler, no headers...: time the Python loops
            print(f"lstmlab bench: compiled loops unavailable ({e}); timing the Python loops", file=sys.stderr)
            return "python"
    deadline = time.monotonic() + 5.0
    while _native.get() is None and time.monotonic() < deadline:  # another process may be just finishing
        time.sleep(0.5)
    ops = _native.get()
    if ops is None:
        why = _native.why_unavailable()
        return "python" + (f" ({why})" if why else "")
    gemm, why = ops.gemm(), ops.gemm_reason()
    return f"native, float32 matmuls on {gemm}" + (f" -- {why.split(': ')[0]}" if why else "")


def _bench_one(mode: str, batch: int, seq_len: int, input_size: int, hidden_size: int, layers: int,
               backends: list[str], repeats: int, warmup: int, min_samples: int, device: Any,
               seed: int, clock: str = "wall", variant: tuple[str, Any, float] = PLAIN, bidirectional: bool = False,
               min_seconds: float = 0.0) -> list[dict[str, Any]]:
    """One batch size, mode and variant: every backend, interleaved (torch runs plain nn.LSTM)."""
    import torch

    steps = {name: _make_step(mode, name, batch, seq_len, input_size, hidden_size, layers, device, seed,
                              PLAIN if name == "torch" else variant, bidirectional)
             for name in backends}
    outputs = {}
    for name, step in steps.items():
        for _ in range(warmup):
            step()
        outputs[name] = step()  # inference modes: the logits, compared with nn.LSTM's below
    per_round = max(1, math.ceil(min_samples / batch), _steps_for(min_seconds, steps.values(), device))
    memory = {name: _peak_memory(step, device) for name, step in steps.items()}
    now = time.process_time if clock == "cpu" else time.perf_counter
    rates: dict[str, list[float]] = {name: [] for name in backends}
    for r in range(repeats):
        order = backends[r % len(backends):] + backends[: r % len(backends)]  # rotate who goes first
        for name in order:
            _sync(device)
            start = now()
            for _ in range(per_round):
                steps[name]()
            _sync(device)
            rates[name].append(per_round * batch / (now() - start))
    medians = {name: statistics.median(v) for name, v in rates.items()}
    want = outputs.get("torch")
    diffs = {name: None if want is None or out is None else (out.float() - want.float()).abs().max().item()
             for name, out in outputs.items()}
    base = medians.get("torch")
    ref = medians.get("reference")
    cell, zoneout, recurrent_dropout = variant
    del steps
    return [
        {
            "backend": name,
            "batch_size": batch,
            "mode": mode,
            "variant": variant_label(cell, zoneout, recurrent_dropout),
            "cell": "lstm" if name == "torch" else cell,
            "zoneout": 0.0 if name == "torch" else (list(zoneout) if isinstance(zoneout, tuple) else zoneout),
            "recurrent_dropout": 0.0 if name == "torch" else recurrent_dropout,
            "samples_per_s": medians[name],
            "samples_per_s_all": rates[name],
            "ratio_vs_torch": (medians[name] / base) if base else None,
            "ratio_vs_reference": (medians[name] / ref) if ref else None,
            "peak_memory_mib": memory[name],
            "memory_measure": _memory_label(device),
            "seq_len": seq_len,
            "input_size": input_size,
            "hidden_size": hidden_size,
            "layers": layers,
            "bidirectional": bidirectional,
            "ms_per_batch": 1e3 * batch / medians[name],
            "max_abs_diff_vs_torch": diffs[name],
            "threads": torch.get_num_threads(),
            "clock": clock,
            "device": str(device),
        }
        for name in backends
    ]


def _make_step(mode: str, backend: str, batch: int, seq_len: int, input_size: int, hidden_size: int,
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


def _steps_for(min_seconds: float, steps: Any, device: Any) -> int:
    """Steps per timed round so that every backend's round lasts ``min_seconds`` at least (0: one step)."""
    if min_seconds <= 0:
        return 1
    fastest = math.inf
    for step in steps:
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        fastest = min(fastest, time.perf_counter() - start)
    return max(1, math.ceil(min_seconds / max(fastest, 1e-6)))


def _sync(device: Any) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def _memory_label(device: Any) -> str:
    return "cuda max_memory_allocated" if device.type == "cuda" else "CPU peak RSS growth (VmHWM)"


def _peak_memory(step: Callable[[], None], device: Any) -> float | None:
    """MiB that one step needs at its peak above what was in use before it; None where it cannot be measured.

    CUDA: the caching allocator's peak. CPU: Linux's peak resident set (VmHWM) after resetting it, minus the
    resident set before the step; the fused backend's scratch pool is emptied first so that it is counted.
    """
    import gc

    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    try:
        from lstmlab.nn.fused import release_buffers

        release_buffers()
    except ImportError:
        pass
    gc.collect()
    _malloc_trim()  # hand freed heap back to the OS, so that this step's allocations show in the resident set
    try:
        rss = _proc_status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        step()
        peak = _proc_status_kib("VmHWM")
    except (OSError, ValueError):
        step()
        return None
    return max(0.0, (peak - rss) / 1024)


def _warm_allocator() -> None:
    """Make glibc keep freed blocks of any size in its heap for reuse. By default it returns blocks above a
    dynamic threshold (at most 32 MiB) to the OS, so a backend whose step allocates such temporaries anew (nn.LSTM
    at B=256 and up) page-faults them in again every step: up to a third of its time here."""
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    libc = _glibc()
    ok = libc is not None and libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, (1 << 31) - 1)
    _check(bool(ok), "--allocator warm needs glibc's mallopt (Linux with glibc); use --allocator default")


def _glibc() -> Any:
    """glibc through ctypes, or None where the C library is another one."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - both are glibc's own
    except (OSError, AttributeError):
        return None
    return libc


def _malloc_trim() -> None:
    libc = _glibc()
    if libc is not None:  # not glibc: the figure may then undercount reused memory
        libc.malloc_trim(0)


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise ValueError(f"{field} not in /proc/self/status")


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of benchmark rows."""
    if not rows:
        return "(no results)"
    first = rows[0]
    lines = [
        f"LSTM T={first['seq_len']} I={first['input_size']} H={first['hidden_size']} layers={first['layers']} "
        f"device={first['device']} threads={first['threads']} clock={first.get('clock', 'wall')} "
        f"allocator={first.get('allocator', 'default')}; "
        "samples/s = median of repeats; "
        f"x torch = ratio to plain nn.LSTM in this run; x ref = ratio to the same variant on the reference backend; "
        f"memory = {first['memory_measure']}"
        + (f"; fused step loops: {first['fused_loops']}" if first.get("fused_loops") else "")
        + (f"; machine: {first['machine']}" if first.get("machine") else ""),
        f"{'backend':<10} {'B':>6} {'mode':<8} {'samples/s':>11} {'x torch':>8} {'x ref':>8} {'peak MiB':>9}  variant",
    ]

    def ratio(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}x"

    for row in rows:
        mem = "n/a" if row["peak_memory_mib"] is None else f"{row['peak_memory_mib']:.1f}"
        variant = "nn.LSTM" if row["backend"] == "torch" else row.get("variant", "lstm")
        lines.append(f"{row['backend']:<10} {row['batch_size']:>6} {row['mode']:<8} "
                     f"{row['samples_per_s']:>11.0f} {ratio(row['ratio_vs_torch']):>8} "
                     f"{ratio(row.get('ratio_vs_reference')):>8} {mem:>9}  {variant}")
    return "\n".join(lines)


def grid_benchmark(backends: Sequence[str] = GRID_BACKENDS, repeats: int = 5, warmup: int = 2,
                   min_seconds: float = 0.25, threads: int | None = None, seed: int = 0, clock: str = "wall",
                   allocator: str = "default", grid: Sequence[tuple[str, int, int, int, int, int, bool]] = GRID,
                   ) -> list[dict[str, Any]]:
    """:func:`benchmark` over ``grid`` ((mode, B, T, I, H, layers, bidirectional) each) on the CPU: per shape, every
    backend that runs its mode (the serving ones in inference modes only), timed in turns."""
    rows: list[dict[str, Any]] = []
    for mode, batch, seq_len, input_size, hidden_size, layers, bidirectional in grid:
        names = [b for b in backends if b not in SERVING or mode in INFERENCE_MODES]
        if not names:
            continue
        rows.extend(benchmark(batch_sizes=[batch], seq_len=seq_len, input_size=input_size, hidden_size=hidden_size,
                              layers=layers, backends=names, mode=mode, repeats=repeats, warmup=warmup,
                              min_samples=1, threads=threads, device="cpu", seed=seed, clock=clock,
                              allocator=allocator, bidirectional=bidirectional, min_seconds=min_seconds))
    return rows


def format_grid(rows: list[dict[str, Any]]) -> str:
    """The grid's rows as a Markdown table, one line per shape: each backend's ms per batch and its ratio to nn.LSTM
    (> 1: faster), under a header naming the machine, the matmuls and how it was timed."""
    if not rows:
        return "(no results)"
    first = rows[0]
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    header = (f"machine: {first.get('machine', '?')}; GEMM: lstmlab's float32 matmuls "
              f"{(first.get('fused_loops') or 'not timed').replace('native, float32 matmuls ', '')}, nn.LSTM "
              f"torch's own CPU kernel; clock={first['clock']} allocator={first.get('allocator', 'default')}; "
              "ms = median of the rounds per batch; x = nn.LSTM's time / this backend's, same run")
    cols = ["mode", "B", "T", "I", "H", "layers", "bidir"]
    for b in backends:
        cols += [f"{NAMES[b]} ms"] + ([f"x nn.LSTM ({NAMES[b]})"] if b != "torch" else [])
        cols += [f"max abs diff ({NAMES[b]})"] if b in SERVING else []
    lines = [header, "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    shapes: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in rows:
        key = (r["mode"], r["batch_size"], r["seq_len"], r["input_size"], r["hidden_size"], r["layers"],
               r.get("bidirectional", False))
        shapes.setdefault(key, {})[r["backend"]] = r
    for (mode, *shape, bidir), group in shapes.items():
        cells = [mode, *(str(v) for v in shape), "yes" if bidir else "no"]
        for b in backends:
            r = group.get(b)
            cells.append("-" if r is None else f"{r['ms_per_batch']:.2f}")
            if b != "torch":
                ratio = None if r is None else r["ratio_vs_torch"]
                cells.append("-" if ratio is None else f"{ratio:.2f}x")
            if b in SERVING:  # the logits' largest difference from nn.LSTM's, same weights and inputs
                diff = None if r is None else r.get("max_abs_diff_vs_torch")
                cells.append("-" if diff is None else f"{diff:.1e}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
