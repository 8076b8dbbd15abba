"""From a picture to the model's input: any image of a digit made MNIST-like (grayscale, white ink on black, the
digit scaled into a 20x20 box keeping its aspect ratio, then placed in the 28x28 frame so that its centre of mass
is at the centre; lighting removed only where the background is uneven), the sequence a checkpoint reads, and its
answer. Used by ``lstmlab predict``, ``lstmlab gates --image``, the demo and the plot of mistakes.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from lstmlab.errors import LstmlabError

if TYPE_CHECKING:
    from PIL import Image as PILImage

    from lstmlab.checkpoint import Checkpoint

# Refuse larger images before decoding them: 40 megapixels is a 7300 x 5500 photo, far more than a digit needs.
MAX_PIXELS = 40_000_000
BOX = 20  # MNIST: the digit fits a 20x20 box ...
FRAME = 28  # ... centred by mass in a 28x28 frame
STROKE = 2.6  # median MNIST stroke width in pixels (2 * area / boundary of the ink above 50%)
WORK_SIDE = 160  # big images are first averaged down to this longest side before stroke estimation
LIGHT_SIDE = 96  # the background's lighting is estimated at this longest side: it changes slowly, and it is cheap
EVEN_SPREAD = 0.08  # a border whose 10th-90th percentiles are closer than this (of 0..1) is an evenly lit background


def pil():
    """PIL.Image, imported on first use; a one-line error naming the extra when Pillow is missing."""
    try:
        from PIL import Image
    except ImportError:
        raise LstmlabError("reading images needs Pillow: pip install 'lstmlab[plot]'") from None
    return Image


def open_image(path: str | Path) -> PILImage.Image:
    """Open and decode an image file, refusing empty files, non-images and images over ``MAX_PIXELS``.

    The size is checked right after ``Image.open``, which reads only the header, so a huge image is
    refused without ever being decoded.
    """
    Image = pil()
    path = Path(path)
    if not path.is_file():
        raise LstmlabError(f"image {path} does not exist or is not a file")
    if path.stat().st_size == 0:
        raise LstmlabError(f"image {path} is an empty file")
    try:
        with warnings.catch_warnings():
            # PIL only warns between its limit and twice it; treat that as the refusal it is.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        found = re.search(r"\((\d+) pixels\)", str(e))  # PIL says "Image size (N pixels) exceeds limit ..."
        size = f"has {int(found.group(1)):,} pixels" if found else "is huge"
        raise LstmlabError(f"image {path} {size}, over the {MAX_PIXELS:,}-pixel limit; crop or shrink it") from None
    except Image.UnidentifiedImageError:
        raise LstmlabError(f"{path} is not an image Pillow can read (PNG, JPEG, BMP, GIF, TIFF, ...)") from None
    except OSError as e:
        raise LstmlabError(f"cannot read image {path}: {e}") from None
    try:
        width, height = img.size
        if width * height > MAX_PIXELS:
            raise LstmlabError(
                f"image {path} is {width} x {height} pixels, over the {MAX_PIXELS:,}-pixel limit; crop or shrink it"
            )
        if width == 0 or height == 0:
            raise LstmlabError(f"image {path} has no pixels ({width} x {height})")
        try:
            img.load()
        except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt data after a valid header
            raise LstmlabError(f"image {path} is damaged and cannot be decoded ({e})") from None
    except BaseException:
        img.close()  # never leave the file handle to the garbage collector
        raise
    return img


def _to_gray(img: PILImage.Image) -> tuple[np.ndarray, bool]:
    """Any PIL image -> (float32 (H, W) gray in 0..1, whether the mode has a fixed 8-bit scale)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img.convert("F") if img.mode != "F" else img, dtype=np.float64)
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(a.min()), float(a.max())
        # High bit depths carry no fixed white level (12-bit data in 16-bit files): stretch to their own range.
        return ((a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)).astype(np.float32), False
    if img.mode == "1":
        return np.asarray(img.convert("L"), dtype=np.float32) / 255.0, True
    has_alpha = img.mode in ("RGBA", "LA", "La", "RGBa", "PA") or (img.mode == "P" and "transparency" in img.info)
    if not has_alpha:
        if img.mode not in ("L", "RGB"):
            img = img.convert("RGB")
        return np.asarray(img.convert("L"), dtype=np.float32) / 255.0, True
    rgba = img.convert("RGBA")
    alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32) / 255.0
    gray = np.asarray(rgba.convert("RGB").convert("L"), dtype=np.float32) / 255.0
    # Composite on white, unless the visible strokes are light (white ink on a transparent sheet): then on black.
    weight = float(alpha.sum())
    background = 0.0 if weight > 0 and float((gray * alpha).sum()) / weight > 0.5 and alpha.min() < 1 else 1.0
    return (gray * alpha + background * (1.0 - alpha)).astype(np.float32), True


def _border(a: np.ndarray) -> np.ndarray:
    """The outer frame of pixels (about 5% of each side, at least one pixel)."""
    h, w = a.shape
    k = max(1, min(h, w) // 20)
    return np.concatenate([a[:k].ravel(), a[-k:].ravel(), a[:, :k].ravel(), a[:, -k:].ravel()])


def _resize(a: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize a float image: area averaging when shrinking (as MNIST's anti-aliasing), bilinear when growing."""
    Image = pil()
    shrinking = width < a.shape[1] or height < a.shape[0]
    method = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
    img = Image.fromarray(np.ascontiguousarray(a, dtype=np.float32))  # float32 (H, W) -> mode "F"
    return np.array(img.resize((width, height), method), np.float32)


def _stroke_width(ink: np.ndarray) -> float:
    """Estimated stroke width in pixels: 2 * area / boundary length of the binarised ink."""
    mask = ink > 0.5
    area = int(mask.sum())
    if area == 0:
        return 0.0
    padded = np.pad(mask, 1)
    inner = padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    boundary = area - int(inner.sum())
    return 2.0 * area / max(boundary, 1)


def _dilate(ink: np.ndarray, k: int) -> np.ndarray:
    """Grey dilation with a k x k square (max filter), growing the canvas by k // 2 on each side."""
    t = torch.from_numpy(np.pad(ink, k // 2))[None, None]  # (1, 1, H, W)
    t = torch.nn.functional.max_pool2d(t, (1, k), stride=1, padding=(0, k // 2))  # separable: rows then columns
    t = torch.nn.functional.max_pool2d(t, (k, 1), stride=1, padding=(k // 2, 0))
    return t[0, 0].numpy()


def _box_blur(a: np.ndarray, radius: int) -> np.ndarray:
    """Mean over a (2r+1)^2 square, edges averaging only the pixels inside the image."""
    if radius < 1:
        return a
    k = 2 * radius + 1
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None]
    pool = torch.nn.functional.avg_pool2d  # separable, rows then columns: a tenth of the square kernel's time
    t = pool(t, (1, k), stride=1, padding=(0, radius), count_include_pad=False)
    t = pool(t, (k, 1), stride=1, padding=(radius, 0), count_include_pad=False)
    return t[0, 0].numpy()


def _detail_skew(a: np.ndarray) -> float:
    """Skewness of the image minus its local mean: negative when the details (ink) are darker than around them."""
    h, w = a.shape
    f = min(1.0, LIGHT_SIDE / max(h, w))
    small = _resize(a, max(1, round(w * f)), max(1, round(h * f))) if f < 1 else a
    detail = small - _box_blur(small, max(1, round(max(small.shape) / 12)))
    detail = detail - detail.mean()
    return float((detail**3).mean() / max(float((detail**2).mean()) ** 1.5, 1e-12))


def _erode_dilate(t: Tensor, k: int, dilate: bool) -> Tensor:
    """k x k grey dilation (or erosion) of a (1, 1, H, W) tensor, separable; max_pool2d's padding never wins."""
    sign = 1.0 if dilate else -1.0
    x = torch.nn.functional.max_pool2d(sign * t, (1, k), stride=1, padding=(0, k // 2))
    return sign * torch.nn.functional.max_pool2d(x, (k, 1), stride=1, padding=(k // 2, 0))


def _local_stroke_width(small: np.ndarray, widest: int) -> float:
    """Stroke width in pixels of ``small`` (light on dark) under any lighting: 2 * area / boundary of what stands
    out of an opening ``widest`` pixels wide (a top-hat: strokes stay whole, shadows and gradients go)."""
    t = torch.from_numpy(np.ascontiguousarray(small, dtype=np.float32))[None, None]
    tophat = (t - _erode_dilate(_erode_dilate(t, widest, False), widest, True))[0, 0].numpy()
    tophat = _box_blur(tophat, 1)  # one noisy pixel is not a stroke
    return _stroke_width((tophat > 0.5 * float(tophat.max())).astype(np.float32))


def _remove_lighting(a: np.ndarray, inverted: bool = False) -> np.ndarray:
    """Ink (light on dark, ``a`` in 0..1) with the background's own level at each pixel taken away.

    The background is estimated at ``LIGHT_SIDE`` pixels a side by a grey opening (erase every bright structure
    narrower than the opening: strokes) then smoothed, so a shadow, a lamp's gradient or a tinted corner is
    background however dark it is. The opening is a sixth of the image, and at least three stroke widths, so a bold
    stroke is never taken for background. When the picture was dark ink on light paper (``inverted``), the residual
    is divided by the local paper brightness: ink under a shadow is as dark relative to its paper as ink in the
    light, so both come out equally strong.
    """
    h, w = a.shape
    f = min(1.0, LIGHT_SIDE / max(h, w))
    small = _resize(a, max(1, round(w * f)), max(1, round(h * f))) if f < 1 else a
    side = max(small.shape)
    widest = max(3, round(side / 2.5)) | 1  # a stroke a fifth of a digit as wide as the image fits well inside
    k = min(max(3, round(side / 6), round(3 * _local_stroke_width(small, widest))), widest) | 1
    t = torch.from_numpy(np.ascontiguousarray(small, dtype=np.float32))[None, None]
    t = _erode_dilate(_erode_dilate(t, k, False), k, True)  # opening: the ink goes, the lighting stays
    s = max(1, k // 3) | 1  # smooth the opening's flat steps ...
    smooth = torch.nn.functional.avg_pool2d(t, s, stride=1, padding=s // 2, count_include_pad=False)
    t = torch.maximum(t, smooth)  # ... but never below the opening: a hard shadow edge stays hard, not half ink
    background = t[0, 0].numpy()
    if background.shape != a.shape:
        background = _resize(background, w, h)
    background = np.minimum(background, a.max())  # the smoothing can overshoot a bright edge, never the data
    ink = a - background
    spread = np.abs(ink - np.median(ink))
    noise = 1.4826 * float(np.median(spread))  # the residual of most pixels (paper) is noise: its robust sigma
    ink = ink - 3.0 * noise  # sensor noise and paper grain are not ink, least of all once a shadow is divided out
    if inverted:  # relative to the paper's brightness; a black shadow (paper below 10% of the brightest) is not ink
        paper = 1.0 - background
        ink = ink / np.maximum(paper, 0.1 * max(float(paper.max()), 1e-6))
    return np.clip(ink, 0.0, None).astype(np.float32)


def _even_ink(a: np.ndarray, border: np.ndarray) -> np.ndarray:
    """Ink of an evenly lit picture (light on dark): what rises above the border's level and its noise; nothing else
    is touched, so soft stroke edges stay as they are."""
    level = float(np.percentile(border, 90))
    noise = 1.4826 * float(np.median(np.abs(border - np.median(border))))
    return np.clip(a - (level + 3.0 * noise), 0.0, None).astype(np.float32)


def _ink(a: np.ndarray) -> tuple[np.ndarray, bool]:
    """(ink light on dark with no background left, whether the background was even) of a gray picture in 0..1.

    Polarity: MNIST is light ink on a dark background. A border that is mostly one even level tells which is
    background, even where a bold digit touches the edges; otherwise the ink is the side on which the details stand
    out of their surroundings. Only an uneven background has its lighting removed: a clean picture keeps its strokes.
    """
    border = _border(a)
    low, background, high = np.percentile(border, [10, 50, 90])
    even = high - low < EVEN_SPREAD
    light = background > 0.5
    # Ink touching the edges is at most the 30% of the border on the ink's side; the rest is the background's level.
    bulk = np.percentile(border, [30, 90] if light else [10, 70])
    if abs(background - 0.5) >= 0.1 and bulk[1] - bulk[0] < EVEN_SPREAD:
        inverted = light
    else:
        inverted = _detail_skew(a) < 0
    if inverted:
        a = 1.0 - a
    return (_even_ink(a, _border(a)) if even else _remove_lighting(a, inverted)), even


def _crop(ink: np.ndarray, even: bool, fixed_scale: bool) -> np.ndarray:
    """The ink scaled to 0..1 and cropped to its bounding box; ``LstmlabError`` when there is no ink."""
    smooth = max(1, round(max(ink.shape) / 150))  # about a pixel of a 150-pixel digit: below any stroke's width
    blurred = _box_blur(ink, smooth)
    contrast = float(blurred.max())  # the ink's level, not one noisy pixel's
    if contrast <= (0.1 if fixed_scale else 1e-6):
        raise LstmlabError("the image is blank: no digit found (draw or write a digit, dark on light or light on dark)")
    ink = np.clip(ink / contrast, 0.0, 1.0)
    if not even:
        ink[ink < 0.15] = 0.0  # paper texture and JPEG noise under uneven light are not ink
    # Crop on a lightly smoothed copy: single noisy pixels of a photo must not stretch the box. Under even light the
    # faintest stroke edges are part of the digit (MNIST's box holds them): any ink next to more ink counts.
    if even:
        ys, xs = np.nonzero((ink > 0) & (blurred > 0.05 * contrast))
    else:
        ys, xs = np.nonzero(blurred > 0.25 * contrast)
    return ink[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


def _thicken(ink: np.ndarray) -> np.ndarray:
    """A thin pen on a big canvas would vanish at 20x20: dilate its strokes to about MNIST's width there."""
    side = max(ink.shape)
    width = _stroke_width(ink)
    if width * BOX / side < 0.8 * STROKE:
        k = int(round(STROKE * side / BOX - width))
        k += 1 - k % 2  # odd, so the dilation is centred
        if k > 1:
            return _dilate(ink, k)
    return ink


def _centre(ink: np.ndarray) -> Tensor:
    """Ink in 0..1 cropped to its box -> scaled into 20x20 keeping its aspect ratio, centred by mass in 28x28."""
    scale = BOX / max(ink.shape)
    out_w = max(1, min(BOX, round(ink.shape[1] * scale)))
    out_h = max(1, min(BOX, round(ink.shape[0] * scale)))
    small = np.clip(_resize(ink, out_w, out_h), 0.0, None)
    small /= max(float(small.max()), 1e-6)
    total = float(small.sum())
    rows, cols = np.indices(small.shape)
    cy = float((rows * small).sum()) / total + 0.5  # centre of mass, in pixel-centre coordinates
    cx = float((cols * small).sum()) / total + 0.5
    top = int(np.clip(round(FRAME / 2 - cy), 0, FRAME - out_h))
    left = int(np.clip(round(FRAME / 2 - cx), 0, FRAME - out_w))
    frame = np.zeros((FRAME, FRAME), dtype=np.float32)
    frame[top : top + out_h, left : left + out_w] = small
    return torch.from_numpy(np.round(frame * 255.0).astype(np.uint8))


def preprocess_image(img: PILImage.Image) -> Tensor:
    """Any picture of one digit -> an MNIST-style uint8 tensor (28, 28): white ink on black, centred.

    Steps: any mode (1, L, P, RGB, RGBA composited on white, LA, I;16, I, F) to grayscale; dark ink on a
    light background is inverted (decided by an evenly lit border, else by which way the details stand out); only
    when the background is uneven (shadows, a lamp's gradient) is its level estimated at every pixel and removed,
    relative to the paper's brightness, along with the noise; crop to the ink's bounding box; thin strokes are
    thickened to MNIST's width; scale into 20x20 keeping the aspect ratio; centre by centre of mass in 28x28. An
    evenly lit picture of bold strokes thus goes through crop, 20x20 and centring only. A blank image raises
    ``LstmlabError``.
    """
    Image = pil()
    if not isinstance(img, Image.Image):
        raise LstmlabError(f"expected a PIL image, got {type(img).__name__}")
    w, h = img.size
    if w * h > MAX_PIXELS:
        raise LstmlabError(f"image is {w} x {h} pixels, over the {MAX_PIXELS:,}-pixel limit; crop or shrink it")
    if w == 0 or h == 0:
        raise LstmlabError("the image has no pixels")
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)  # an animation: read its first frame
    from PIL import ImageOps

    a, fixed_scale = _to_gray(ImageOps.exif_transpose(img))  # phone photos store their rotation in EXIF
    ink, even = _ink(a)
    ink = _crop(ink, even, fixed_scale)
    work = ink
    if max(ink.shape) > WORK_SIDE:  # average big images down first so stroke estimation and dilation stay cheap
        f = WORK_SIDE / max(ink.shape)
        work = _resize(ink, max(1, round(ink.shape[1] * f)), max(1, round(ink.shape[0] * f)))
        work /= max(float(work.max()), 1e-6)
    thick = _thicken(work)
    return _centre(ink if thick is work else thick)  # strokes bold enough go to 20x20 in one resampling, not two


def load_digit(path: str | Path) -> Tensor:
    """Open an image file and preprocess it: uint8 (28, 28); every problem is a one-line LstmlabError."""
    img = open_image(path)
    try:
        return preprocess_image(img)
    except LstmlabError as e:
        raise LstmlabError(f"{path}: {e}") from None
    finally:
        img.close()


def class_names(dataset: str) -> list[str]:
    """The class names of a dataset known to ``lstmlab.data``."""
    from lstmlab.data import DATASETS

    if dataset not in DATASETS:
        raise LstmlabError(f"the checkpoint names an unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")
    return list(DATASETS[dataset].classes)


def model_input(ckpt: Checkpoint, images: Tensor) -> Tensor:
    """uint8 images (B, 28, 28) -> the model's input (B, T, I), normalised as the checkpoint was trained."""
    from lstmlab.data import to_sequence

    d = ckpt.config.data
    mean, std = (d.mean, d.std) if d.mean is not None and d.std is not None else (0.5, 1.0)
    device = next(iter(ckpt.model.parameters()), torch.empty(0)).device  # an ONNX model has none: CPU
    return to_sequence(images, d.view, mean, std, ckpt.permutation).to(device)


@dataclass
class Prediction:
    """One image's result: the top class and the top-k (class index, name, probability)."""

    source: str
    label: int
    name: str
    top: list[tuple[int, str, float]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "image": self.source,
            "prediction": self.label,
            "class_name": self.name,
            "top": [{"class": c, "class_name": n, "probability": p} for c, n, p in self.top],
        }


@torch.no_grad()
def predict_images(ckpt: Checkpoint, images: Tensor, sources: list[str], k: int = 3) -> list[Prediction]:
    """Classify uint8 images (B, 28, 28) already preprocessed; returns one Prediction each."""
    names = class_names(ckpt.config.data.dataset)
    probs = torch.softmax(ckpt.model(model_input(ckpt, images)).float(), dim=1).cpu()  # (B, C)
    k = min(k, probs.size(1))
    top_p, top_c = probs.topk(k, dim=1)
    results = []
    for source, ps, cs in zip(sources, top_p.tolist(), top_c.tolist(), strict=True):
        top = [(c, names[c], p) for c, p in zip(cs, ps, strict=True)]
        results.append(Prediction(source, cs[0], names[cs[0]], top))
    return results

