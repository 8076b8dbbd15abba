"""``lstmlab predict``: classify your own images of digits (made MNIST-like by ``lstmlab.analysis.inputs``), or
with an ONNX file that ``lstmlab export`` wrote; ``--save-input`` writes the 28x28 input the model read."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import Tensor

from lstmlab.analysis.inputs import Prediction, load_digit, pil, predict_images
from lstmlab.errors import LstmlabError


def format_prediction(p: Prediction) -> str:
    """One line: ``digit.png: 7  (7 98.1%, 1 1.2%, 9 0.3%)``."""
    tops = ", ".join(f"{n} {100 * q:.1f}%" for _, n, q in p.top)
    return f"{p.source}: {p.name}  ({tops})"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a .safetensors checkpoint written by `lstmlab train`, or an .onnx file "
                        "written by `lstmlab export` (then run by onnxruntime)")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files, one digit each (PNG, JPEG, ...)")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of one line per image")
    parser.add_argument("--top", type=int, default=3, help="how many classes to list per image (default 3)")
    parser.add_argument("--save-input", metavar="DIR", help="write the 28x28 image the model read for each image "
                        "into DIR (NAME-input.png) and name it beside the answer, to see what went wrong "
                        "(default: none)")


def _read_all(paths: list[str]) -> tuple[list[tuple[str, Tensor]], dict[str, str]]:
    """Each image preprocessed, or the one-line reason it cannot be; no image stops the others."""
    digits: list[tuple[str, Tensor]] = []
    errors: dict[str, str] = {}
    for p in paths:
        try:
            digits.append((p, load_digit(p)))
        except LstmlabError as e:
            errors[p] = str(e)
        except Exception as e:  # noqa: BLE001 - a decoder bug on one odd file must not cost the other answers
            errors[p] = f"cannot read image {p} ({type(e).__name__}: {e})".replace("\n", " ")
    return digits, errors


def _input_names(paths: list[str]) -> dict[str, str]:
    """A distinct ``NAME-input.png`` for each image path (a counter where two images share a name)."""
    names: dict[str, str] = {}
    taken: set[str] = set()
    for p in paths:
        stem, k = Path(p).stem or "image", 1
        name = f"{stem}-input.png"
        while name in taken:
            k += 1
            name = f"{stem}-{k}-input.png"
        taken.add(name)
        names[p] = name
    return names


def check_folder(folder: Path) -> None:
    """Make ``folder`` and prove it writable before any work, so a bad --save-input costs nothing."""
    from lstmlab.files import atomic_write_bytes, write_error

    if folder.exists() and not folder.is_dir():
        raise LstmlabError(f"--save-input {folder} is a file, not a folder; give a folder")
    probe = folder / ".lstmlab-write-check"
    atomic_write_bytes(probe, b"")
    try:
        probe.unlink()
    except OSError as e:
        raise write_error(probe, e) from None


def save_inputs(folder: Path, digits: list[tuple[str, Tensor]]) -> dict[str, str]:
    """Write each preprocessed digit as a 28x28 PNG into ``folder`` (atomically); image path -> written path."""
    import io

    from lstmlab.files import atomic_write_bytes

    Image = pil()
    names = _input_names([p for p, _ in digits])
    written = {}
    for p, digit in digits:
        buffer = io.BytesIO()
        Image.fromarray(digit.numpy()).save(buffer, "PNG")
        atomic_write_bytes(folder / names[p], buffer.getvalue())
        written[p] = str(folder / names[p])
    return written


def run(args: argparse.Namespace) -> int:
    """Classify every image given: an answer for each readable one, a one-line error for each other; exit 2 if any
    failed."""
    import sys

    from lstmlab.checkpoint import load_checkpoint

    if args.top < 1:
        raise LstmlabError(f"--top must be at least 1, got {args.top}")
    if str(args.checkpoint).endswith(".onnx"):
        from lstmlab.onnxfile import load_onnx

        ckpt = load_onnx(args.checkpoint)
    else:
        ckpt = load_checkpoint(args.checkpoint)
    folder = Path(args.save_input) if args.save_input else None
    if folder is not None:
        check_folder(folder)
    paths = [str(p) for p in args.images]
    digits, errors = _read_all(paths)
    results: dict[str, Prediction] = {}
    if digits:
        images = torch.stack([d for _, d in digits])  # (N, 28, 28)
        answers = predict_images(ckpt, images, [p for p, _ in digits], k=args.top)
        results = {r.source: r for r in answers}
    saved = save_inputs(folder, digits) if folder is not None else {}  # all written before any answer is printed
    records = []
    for p in paths:  # in the order given, each image once
        if p in errors:
            print(f"lstmlab predict: error: {errors[p]}", file=sys.stderr)
            records.append({"image": p, "error": errors[p]})
        elif p in results:
            if not args.json:
                print(format_prediction(results[p]) + (f"  input: {saved[p]}" if p in saved else ""), flush=True)
            records.append(results[p].to_dict() | ({"input": saved[p]} if p in saved else {}))
    if args.json:
        print(json.dumps(records, indent=2))
    return 2 if errors else 0
