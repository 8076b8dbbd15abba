"""Top-1 of ``lstmlab predict``'s preprocessing on digits made to look drawn, scanned and photographed.

    python benchmarks/photo_digits.py --checkpoint runs/x/best.safetensors --data-dir /path/to/mnist
    python benchmarks/photo_digits.py --checkpoint ... --before HEAD~1      # also the preprocessing of another commit

Every image is synthesised here, from two sources: handwriting (MNIST *test* digits, which no run trains on, drawn
big as dark ink on paper) and print (the digit in Pillow's bundled font). Each is rendered three ways:

- ``drawn``: black on white, as the demo's canvas sends it;
- ``scanned``: off-white paper with grain, a mild lamp gradient, a slight tilt and blur, JPEG;
- ``photographed``: uneven light (a strong gradient from one side), a soft shadow over a corner or a band, a
  vignette, sensor noise, blur, a perspective tilt, a warm tint, JPEG.

The same images (same seed) go through the current preprocessing and, with ``--before REV``, through
``src/lstmlab/predict.py`` as it was at git revision REV; the script prints top-1 per set and source.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont

SETS = ("drawn", "scanned", "photographed")


def _digit_mask(source: str, k: int, digit: int, mnist: torch.Tensor | None, size: int) -> np.ndarray:
    """Ink coverage 0..1 of one digit, ``size`` pixels a side."""
    if source == "handwriting":
        img = Image.fromarray(mnist[k].numpy()).resize((size, size), Image.Resampling.BICUBIC)
        return np.clip(np.asarray(img, np.float32) / 255.0, 0, 1)
    img = Image.new("L", (size, size), 0)
    font = ImageFont.load_default(size=round(size * 0.9))
    ImageDraw.Draw(img).text((size / 2, size / 2), str(digit), fill=255, font=font, anchor="mm")
    return np.asarray(img, np.float32) / 255.0


def _perspective_coefficients(src: list[tuple[float, float]], dst: list[tuple[float, float]]) -> list[float]:
    """PIL's 8 PERSPECTIVE coefficients mapping output points ``dst`` to input points ``src``."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(dst, src, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs += [u, v]
    return np.linalg.solve(np.array(rows, float), np.array(rhs, float)).tolist()


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert(img.mode)


def render(mask: np.ndarray, kind: str, rng: np.random.Generator) -> Image.Image:
    """One digit mask as a drawn, scanned or photographed picture."""
    side = mask.shape[0]
    w, h = int(rng.integers(side + 60, side * 2)), int(rng.integers(side + 60, side * 2))
    ink = np.zeros((h, w), np.float32)
    top, left = int(rng.integers(10, h - side - 10)), int(rng.integers(10, w - side - 10))
    ink[top : top + side, left : left + side] = mask
    if kind == "drawn":
        return Image.fromarray(np.round(255 * (1 - ink)).astype(np.uint8)).convert("RGB")
    paper = rng.uniform(0.82, 0.95)
    dark = rng.uniform(0.05, 0.3)  # the ink's reflectance: pencil is grey, a marker nearly black
    reflect = paper * (1 - ink) + dark * ink
    reflect *= 1 + rng.normal(0, 0.015, (h, w))  # paper grain
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = ((xx - w / 2) * np.cos(angle) + (yy - h / 2) * np.sin(angle)) / max(w, h) + 0.5  # 0..1 across
    img = Image.fromarray(np.clip(reflect * 255, 0, 255).astype(np.uint8))
    if kind == "scanned":
        img = img.rotate(rng.uniform(-3, 3), Image.Resampling.BILINEAR, fillcolor=int(paper * 255))
        light = 1 - rng.uniform(0.0, 0.12) * ramp
        a = np.asarray(img, np.float32) * light
        img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.7))
        return _jpeg(img.convert("RGB"), int(rng.integers(60, 90)))
    # photographed: a perspective tilt first (the paper is tilted), then the light falls on it
    d = 0.08 * min(w, h)
    corners = [(0, 0), (w, 0), (w, h), (0, h)]
    moved = [(x + rng.uniform(-d, d), y + rng.uniform(-d, d)) for x, y in corners]
    img = img.transform((w, h), Image.Transform.PERSPECTIVE, _perspective_coefficients(moved, corners),
                        Image.Resampling.BILINEAR, fillcolor=int(paper * 255))
    a = np.asarray(img, np.float32) / 255
    light = 1 - rng.uniform(0.3, 0.65) * ramp  # a lamp on one side: the far side gets a third to two thirds
    shadow = np.zeros((h, w), np.float32)
    if rng.random() < 0.5:  # a corner in the shadow of a hand or a phone
        cx, cy = rng.choice([0, w]), rng.choice([0, h])
        r = rng.uniform(0.3, 0.55) * max(w, h)
        shadow = (np.hypot(xx - cx, yy - cy) < r).astype(np.float32)
    else:  # a band of shadow across the page
        b = rng.uniform(-0.4, 0.4)
        edge = ((xx - w / 2) * np.cos(angle + 1.3) + (yy - h / 2) * np.sin(angle + 1.3)) / max(w, h)
        shadow = (edge > b).astype(np.float32)
    blur = max(2, int(0.04 * max(w, h)))
    shadow = np.asarray(Image.fromarray(shadow * 255).convert("L").filter(ImageFilter.GaussianBlur(blur)),
                        np.float32) / 255  # a soft edge
    light *= 1 - rng.uniform(0.35, 0.65) * shadow
    light *= 1 - 0.25 * (np.hypot(xx - w / 2, yy - h / 2) / np.hypot(w / 2, h / 2)) ** 2  # vignette
    a = a * light + rng.normal(0, rng.uniform(0.01, 0.04), (h, w))
    tint = np.array([1.0, rng.uniform(0.85, 0.97), rng.uniform(0.65, 0.9)], np.float32)  # warm indoor light
    rgb = np.clip(a[..., None] * tint * 255, 0, 255).astype(np.uint8)
    img = Image.fromarray(rgb).filter(ImageFilter.GaussianBlur(rng.uniform(0.8, 1.8)))
    return _jpeg(img, int(rng.integers(50, 85)))


def _module_at(rev: str):
    """The preprocessing module (today lstmlab.analysis.inputs) as it was at git revision ``rev``, imported under
    another name."""
    root = Path(__file__).resolve().parents[1]
    for where in ("src/lstmlab/analysis/inputs.py", "src/lstmlab/commands/predict.py", "src/lstmlab/predict.py"):
        shown = subprocess.run(["git", "show", f"{rev}:{where}"], cwd=root, capture_output=True, text=True)
        if shown.returncode == 0:
            break
    else:
        raise SystemExit(f"no predict.py at git revision {rev}: {shown.stderr.strip()}")
    text = shown.stdout
    path = Path(tempfile.mkdtemp(prefix="lstmlab-before-")) / "predict_before.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("lstmlab_predict_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a .safetensors checkpoint of an MNIST rows model")
    parser.add_argument("--data-dir", required=True, help="the MNIST folder (test digits are the handwriting)")
    parser.add_argument("--n", type=int, default=200, help="digits per source and set (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the rendering (default 0)")
    parser.add_argument("--before", metavar="REV", help="also measure predict.py as of this git revision")
    parser.add_argument("--save", metavar="DIR", help="write the first 10 images of each set here, to look at")
    args = parser.parse_args(argv)

    from lstmlab.analysis.inputs import predict_images, preprocess_image
    from lstmlab.checkpoint import load_checkpoint
    from lstmlab.data import load_dataset
    from lstmlab.errors import LstmlabError

    torch.set_num_threads(1)
    ckpt = load_checkpoint(args.checkpoint)
    images, labels = load_dataset("mnist", "test", data_dir=args.data_dir)
    versions = {"now": preprocess_image}
    if args.before:
        versions = {f"before ({args.before})": _module_at(args.before).preprocess_image, **versions}
    print(f"{args.n} digits per source and set; checkpoint {args.checkpoint}")
    for kind in SETS:
        for source in ("handwriting", "print"):
            rng = np.random.default_rng([args.seed, SETS.index(kind), source == "print"])
            picks = rng.choice(len(labels), args.n, replace=False) if source == "handwriting" else None
            truth, pictures = [], []
            for j in range(args.n):
                k = int(picks[j]) if picks is not None else j
                digit = int(labels[k]) if source == "handwriting" else j % 10
                mask = _digit_mask(source, k, digit, images, int(rng.integers(90, 300)))
                pictures.append(render(mask, kind, rng))
                truth.append(digit)
            if args.save:
                folder = Path(args.save)
                folder.mkdir(parents=True, exist_ok=True)
                for j, p in enumerate(pictures[:10]):
                    p.save(folder / f"{kind}-{source}-{j}-{truth[j]}.jpg")
            line = []
            for name, preprocess in versions.items():
                digits, failed = [], 0
                for p in pictures:
                    try:
                        digits.append(preprocess(p))
                    except LstmlabError:  # "blank": counts as wrong
                        failed += 1
                        digits.append(torch.zeros(28, 28, dtype=torch.uint8))
                got = [r.label for r in predict_images(ckpt, torch.stack(digits), [""] * len(digits))]
                top1 = 100 * float(np.mean(np.array(got) == np.array(truth)))
                line.append(f"{name} {top1:5.1f}%" + (f" ({failed} refused)" if failed else ""))
            print(f"{kind:13s} {source:11s} top-1: " + "   ".join(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
