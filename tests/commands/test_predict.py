"""``lstmlab predict``: MNIST-style preprocessing of any image, classification, one-line errors."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from trained import trained_run

from lstmlab.cli import main
from lstmlab.errors import LstmlabError

Image = pytest.importorskip("PIL.Image")
ImageDraw = pytest.importorskip("PIL.ImageDraw")
ImageFont = pytest.importorskip("PIL.ImageFont")

TOP3_FLOOR = 0.75  # of the 130 made-up printed digits, the expected one must be in the top 3 this often


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory, mnist_dir: Path) -> Path:
    return trained_run(tmp_path_factory.getbasetemp(), mnist_dir)


# ---------------------------------------------------------------------------------------------
# images made in the test: a digit as a mask (0..1), then any colours, mode and size


def _font(px: int):
    font = ImageFont.load_default(size=px)  # Pillow's bundled FreeType font: no system fonts needed
    if not isinstance(font, ImageFont.FreeTypeFont):
        pytest.skip("this Pillow has no FreeType support for sized text")
    return font


def digit_mask(digit: int, canvas: tuple[int, int] = (280, 280), scale: float = 0.7, strokes: bool = False,
               centre: tuple[float, float] = (0.5, 0.5), width: float = 0.08) -> np.ndarray:
    """A float (H, W) mask, 1 = ink: the digit as text, or for a few digits drawn with pen strokes."""
    w, h = canvas
    img = Image.new("L", canvas, 0)
    draw = ImageDraw.Draw(img)
    cx, cy = centre[0] * w, centre[1] * h
    size = scale * min(w, h)
    if strokes:
        pen = max(1, round(width * size))
        s = size / 2
        shapes = {
            0: lambda: draw.ellipse([cx - 0.6 * s, cy - s, cx + 0.6 * s, cy + s], outline=255, width=pen),
            1: lambda: draw.line([(cx - 0.2 * s, cy - 0.7 * s), (cx + 0.1 * s, cy - s), (cx + 0.05 * s, cy + s)],
                                 fill=255, width=pen, joint="curve"),
            4: lambda: (draw.line([(cx + 0.1 * s, cy - s), (cx - 0.6 * s, cy + 0.3 * s), (cx + 0.6 * s, cy + 0.3 * s)],
                                  fill=255, width=pen, joint="curve"),
                        draw.line([(cx + 0.25 * s, cy - 0.5 * s), (cx + 0.25 * s, cy + s)], fill=255, width=pen)),
            7: lambda: draw.line([(cx - 0.6 * s, cy - s), (cx + 0.6 * s, cy - s), (cx - 0.1 * s, cy + s)],
                                 fill=255, width=pen, joint="curve"),
        }
        shapes[digit]()
    else:
        draw.text((cx, cy), str(digit), fill=255, font=_font(max(4, round(size))), anchor="mm")
    return np.asarray(img, dtype=np.float32) / 255.0


def render(mask: np.ndarray, style: str) -> Image.Image:
    """The mask as an image of one style (mode and colours)."""
    m = mask[..., None]  # (H, W, 1)

    def rgb(ink, paper):
        return Image.fromarray(np.round(np.asarray(paper) * (1 - m) + np.asarray(ink) * m).astype(np.uint8))

    if style == "L black on white":
        return rgb((0, 0, 0), (255, 255, 255)).convert("L")
    if style == "L white on black":
        return rgb((255, 255, 255), (0, 0, 0)).convert("L")
    if style == "RGB blue on yellow":
        return rgb((20, 30, 120), (250, 240, 170))
    if style == "RGB red on grey":
        return rgb((200, 0, 0), (200, 200, 200))
    if style == "RGBA black on transparent":
        rgba = np.zeros(mask.shape + (4,), np.uint8)
        rgba[..., 3] = np.round(mask * 255)
        return Image.fromarray(rgba)
    if style == "RGBA white on transparent":
        rgba = np.full(mask.shape + (4,), 255, np.uint8)
        rgba[..., 3] = np.round(mask * 255)
        return Image.fromarray(rgba)
    if style == "LA green-ish":
        la = np.stack([np.round(255 - 200 * mask), np.full(mask.shape, 255.0)], -1).astype(np.uint8)
        return Image.fromarray(la)
    if style == "P palette":
        return rgb((90, 0, 90), (255, 255, 255)).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    if style == "1 bilevel":
        return Image.fromarray(mask < 0.5).convert("1")  # True = white paper, ink black
    if style == "I;16 12-bit dark on light":
        return Image.fromarray(np.round(4095 * (1 - mask)).astype(np.uint16))
    if style == "I;16 full white on black":
        return Image.fromarray(np.round(65535 * mask).astype(np.uint16))
    if style == "I 32-bit":
        return Image.fromarray((100_000 + 5_000_000 * mask).astype(np.int32))
    if style == "F float":
        return Image.fromarray((-3.0 + 8.0 * (1 - mask)).astype(np.float32))
    raise AssertionError(style)


STYLES = ["L black on white", "L white on black", "RGB blue on yellow", "RGB red on grey",
          "RGBA black on transparent", "RGBA white on transparent", "LA green-ish", "P palette", "1 bilevel",
          "I;16 12-bit dark on light", "I;16 full white on black", "I 32-bit", "F float"]
LAYOUTS = {  # name -> digit_mask keyword arguments
    "280 square": {},
    "tiny 24": {"canvas": (24, 24), "scale": 0.9},
    "big 900 thin": {"canvas": (900, 900), "scale": 0.5},
    "wide, off-centre": {"canvas": (700, 260), "scale": 0.8, "centre": (0.25, 0.45)},
}


def _cases() -> list[tuple[int, str, str]]:
    cases = []
    for digit in range(10):
        for k, style in enumerate(STYLES):
            layout = list(LAYOUTS)[(digit + k) % len(LAYOUTS)]  # every style meets every layout across digits
            cases.append((digit, style, layout))
    return cases


# ---------------------------------------------------------------------------------------------
# preprocessing


@pytest.mark.parametrize("style", STYLES)
def test_preprocess_any_mode_gives_mnist_style(style: str) -> None:
    from lstmlab.analysis.inputs import preprocess_image

    out = preprocess_image(render(digit_mask(3), style))
    assert out.dtype == torch.uint8 and out.shape == (28, 28)
    a = out.float() / 255
    assert out.max() == 255  # full contrast
    assert a[:2].sum() == 0 and a[-2:].sum() == 0 and a[:, :2].sum() == 0  # dark border: white ink on black
    rows, cols = np.nonzero(out.numpy())
    assert max(rows.max() - rows.min(), cols.max() - cols.min()) + 1 in (19, 20, 21)  # fits the 20x20 box
    total = a.sum()
    cy = (a.sum(1) * torch.arange(28)).sum() / total + 0.5
    cx = (a.sum(0) * torch.arange(28)).sum() / total + 0.5
    assert abs(cy - 14) <= 1 and abs(cx - 14) <= 1  # centred by mass


def test_preprocess_same_digit_same_result_across_styles() -> None:
    """Polarity, colours and bit depth must not matter: all styles give nearly the same 28x28."""
    from lstmlab.analysis.inputs import preprocess_image

    mask = digit_mask(5)
    ref = preprocess_image(render(mask, "L white on black")).float()
    for style in STYLES:
        out = preprocess_image(render(mask, style)).float()
        assert (out - ref).abs().mean() < 12, style  # of 255: small resampling differences only


def test_preprocess_keeps_aspect_ratio() -> None:
    from lstmlab.analysis.inputs import preprocess_image

    img = Image.new("L", (300, 300), 255)
    ImageDraw.Draw(img).rectangle([140, 20, 160, 280], fill=0)  # a tall bar, 21 x 261
    out = preprocess_image(img).numpy()
    rows, cols = np.nonzero(out > 64)
    assert rows.max() - rows.min() + 1 == 20
    assert cols.max() - cols.min() + 1 <= 4  # still a thin bar, not stretched into a square


def test_preprocess_thickens_thin_pen_on_big_canvas() -> None:
    from lstmlab.analysis.inputs import preprocess_image

    img = Image.new("L", (1000, 1000), 255)
    ImageDraw.Draw(img).line([(200, 100), (800, 100), (450, 900)], fill=0, width=3)  # a 7 with a 3-pixel pen
    out = preprocess_image(img).numpy()
    assert (out > 128).sum() >= 35  # strokes survive at MNIST width (a 1-px line would give ~30 faint pixels)


def photographed(mask: np.ndarray, seed: int = 0, edge: float = 0.1) -> Image.Image:
    """Dark ink on paper under uneven light: a lamp's gradient, a shadow over one corner (its edge ``edge`` of the
    image wide; 0 = hard), sensor noise, a warm tint."""
    rng = np.random.default_rng(seed)
    h, w = mask.shape
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    shadow = np.clip((0.55 - np.hypot(xx - 1, yy - 1)) / max(edge, 1e-6), 0, 1)  # a disc over the corner
    light = (1 - 0.5 * xx) * (1 - 0.55 * shadow)  # the shadowed paper is darker than the ink in the light
    reflect = 0.9 * (1 - mask) + 0.15 * mask
    gray = reflect * light + rng.normal(0, 0.02, mask.shape)
    rgb = np.clip(gray[..., None] * np.array([1.0, 0.93, 0.8]) * 255, 0, 255).astype(np.uint8)
    return Image.fromarray(rgb)


@pytest.mark.parametrize(("digit", "edge"), [(1, 0.1), (4, 0.1), (7, 0.1), (4, 0.0), (7, 0.0)])
def test_shadows_and_uneven_light_are_not_ink(digit: int, edge: float) -> None:
    """A shadowed corner and a lamp's gradient stay background: the crop holds the digit alone, as in even light."""
    from lstmlab.analysis.inputs import preprocess_image

    mask = digit_mask(digit, canvas=(400, 400), scale=0.5, centre=(0.4, 0.4))
    clean = preprocess_image(render(mask, "L black on white")).float()
    shot = preprocess_image(photographed(mask, seed=digit, edge=edge)).float()
    rows, cols = np.nonzero(shot.numpy() > 64)
    assert max(rows.max() - rows.min(), cols.max() - cols.min()) + 1 >= 18  # the digit, not a corner, fills the box
    assert (shot - clean).abs().mean() < 15, (shot - clean).abs().mean()  # of 255: nearly the clean picture
    assert shot[:3].sum() == 0 and shot[:, -3:].sum() == 0  # no shadow in the frame


def test_blank_images_are_refused() -> None:
    from lstmlab.analysis.inputs import preprocess_image

    for img in [Image.new("L", (50, 50), 255), Image.new("RGB", (50, 50), (30, 30, 30)),
                Image.new("RGBA", (50, 50), (0, 0, 0, 0)), Image.new("I;16", (50, 50), 1000),
                Image.new("F", (50, 50), 0.5)]:
        with pytest.raises(LstmlabError, match="blank"):
            preprocess_image(img)
    noisy = Image.fromarray(np.random.default_rng(0).integers(245, 256, (60, 60)).astype(np.uint8))
    with pytest.raises(LstmlabError, match="blank"):
        preprocess_image(noisy)  # paper grain is not a digit


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height: refused sizes must be caught before decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_open_image_refuses_bad_files(tmp_path: Path) -> None:
    from lstmlab.analysis.inputs import load_digit

    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("this is not an image\n")
    truncated = tmp_path / "truncated.png"
    render(digit_mask(2), "L black on white").save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    blank = tmp_path / "blank.png"
    Image.new("RGB", (64, 64), "white").save(blank)
    cases = {
        tmp_path / "missing.png": "does not exist",
        empty: "is an empty file",
        text: "not an image",
        _png_header_only(tmp_path / "huge.png", 20_000, 20_000): "has 400,000,000 pixels, over the 40,000,000-pixel",
        _png_header_only(tmp_path / "warned.png", 10_000, 10_000): "has 100,000,000 pixels, over the",  # PIL warns
        _png_header_only(tmp_path / "big.png", 8_000, 6_000): "is 8000 x 6000 pixels, over the 40,000,000-pixel limit",
        truncated: "damaged",
        blank: "blank",
        tmp_path: "does not exist or is not a file",
    }
    for path, message in cases.items():
        with pytest.raises(LstmlabError, match=message) as info:
            load_digit(path)
        assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# classification with a model trained on MNIST in this session


def test_made_up_digits_are_recognised(run_dir: Path, real_mnist: bool) -> None:
    from lstmlab.analysis.inputs import predict_images, preprocess_image
    from lstmlab.checkpoint import load_checkpoint

    if not real_mnist:
        pytest.skip("needs the real MNIST: synthetic training patterns do not look like digits")
    ckpt = load_checkpoint(run_dir / "best.safetensors")
    cases = _cases()
    images = torch.stack([preprocess_image(render(digit_mask(d, **LAYOUTS[layout]), style))
                          for d, style, layout in cases])
    results = predict_images(ckpt, images, [f"{d} {style} {layout}" for d, style, layout in cases], k=3)
    top3 = [d in [c for c, _, _ in r.top] for (d, _, _), r in zip(cases, results, strict=True)]
    top1 = [r.label == d for (d, _, _), r in zip(cases, results, strict=True)]
    missed = [r.source for r, ok in zip(results, top3, strict=True) if not ok]
    assert sum(top3) / len(cases) >= TOP3_FLOOR, f"top-3 {sum(top3)}/{len(cases)}, top-1 {sum(top1)}; missed {missed}"
    strokes = torch.stack([preprocess_image(render(digit_mask(d, strokes=True, canvas=(500, 500), width=0.02),
                                                   "RGBA black on transparent")) for d in (0, 1, 4, 7)])
    hand = predict_images(ckpt, strokes, ["0", "1", "4", "7"], k=3)
    assert sum(int(r.source) in [c for c, _, _ in r.top] for r in hand) >= 3, [r.top for r in hand]


def test_predict_cli_text_and_json(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = []
    for d, style in [(7, "L black on white"), (0, "RGBA black on transparent"), (3, "I;16 12-bit dark on light")]:
        path = tmp_path / f"digit{d}.png"
        render(digit_mask(d), style).save(path)
        paths.append(str(path))
    ckpt = str(run_dir / "best.safetensors")
    assert main(["predict", ckpt, *paths]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith(p + ": ") for line, p in zip(lines, paths, strict=True))
    assert all(line.count("%") == 3 for line in lines)
    assert main(["predict", ckpt, *paths, "--json", "--top", "5"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["image"] for d in data] == paths
    for d in data:
        assert d["class_name"] == str(d["prediction"]) and len(d["top"]) == 5
        probs = [t["probability"] for t in d["top"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert d["top"][0]["class"] == d["prediction"]


def test_predict_cli_errors_are_one_line(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = str(run_dir / "best.safetensors")
    good = tmp_path / "good.png"
    render(digit_mask(1), "L black on white").save(good)
    blank = tmp_path / "blank.png"
    Image.new("L", (40, 40), 255).save(blank)
    huge = _png_header_only(tmp_path / "huge.png", 20_000, 20_000)
    # A bad image among good ones: the good ones are answered on stdout, the bad one is one line on stderr, exit 2.
    assert main(["predict", ckpt, str(good), str(blank)]) == 2
    captured = capsys.readouterr()
    assert captured.out.startswith(f"{good}: ") and captured.out.count("\n") == 1
    err = captured.err.strip()
    assert err.startswith("lstmlab predict: error: ") and "blank.png: the image is blank" in err and "\n" not in err
    for argv, message in [
        (["predict", ckpt, str(huge)], "has 400,000,000 pixels, over the 40,000,000-pixel limit"),
        (["predict", str(good), str(good)], "not a readable lstmlab checkpoint"),
        (["predict", ckpt, str(good), "--top", "0"], "--top must be at least 1"),
    ]:
        assert main(argv) == 2
        captured = capsys.readouterr()
        assert captured.out == ""  # nothing half-printed before the error
        err = captured.err.strip()
        assert err.startswith("lstmlab predict: error: ") and message in err and "\n" not in err


@pytest.mark.parametrize(("dataset", "view"), [("fashion-mnist", "rows"), ("mnist", "permuted")])
def test_predict_follows_the_checkpoints_dataset_and_view(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          dataset: str, view: str) -> None:
    """Class names come from the checkpoint's dataset; the input is laid out in its view and permutation."""
    from lstmlab.checkpoint import save_checkpoint
    from lstmlab.config import Config, DataConfig, ModelConfig
    from lstmlab.data import DATASETS, make_permutation
    from lstmlab.model import SequenceClassifier

    torch.manual_seed(0)
    config = Config(model=ModelConfig(input_size=28 if view == "rows" else 1, hidden_size=8, backend="torch"),
                    data=DataConfig(dataset=dataset, view=view, mean=0.29, std=0.35))
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, SequenceClassifier(config.model), config, make_permutation(3) if view == "permuted" else None)
    image = tmp_path / "shoe.png"
    render(digit_mask(4), "RGB blue on yellow").save(image)
    assert main(["predict", str(path), str(image), "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    names = list(DATASETS[dataset].classes)
    assert result["class_name"] == names[result["prediction"]]
    assert [t["class_name"] for t in result["top"]] == [names[t["class"]] for t in result["top"]]
    assert main(["predict", str(path), str(image)]) == 0
    assert capsys.readouterr().out.startswith(f"{image}: {result['class_name']}  (")


def test_real_mnist_digits_survive_the_round_trip(run_dir: Path, mnist_dir: Path, real_mnist: bool) -> None:
    """MNIST digits shown as a big dark-on-light picture and preprocessed back are read (almost) as before."""
    from lstmlab.analysis.inputs import predict_images, preprocess_image
    from lstmlab.checkpoint import load_checkpoint
    from lstmlab.data import load_dataset

    if not real_mnist:
        pytest.skip("needs the real MNIST digits")
    images, labels = load_dataset("mnist", "test", data_dir=mnist_dir)
    n = 300
    pictures = [Image.fromarray(255 - images[k].numpy()).resize((280, 280), Image.Resampling.BICUBIC) for k in range(n)]
    back = torch.stack([preprocess_image(p) for p in pictures])
    ckpt = load_checkpoint(run_dir / "best.safetensors")
    before = torch.tensor([r.label for r in predict_images(ckpt, images[:n], [""] * n)])
    after = torch.tensor([r.label for r in predict_images(ckpt, back, [""] * n)])
    agree = (before == after).float().mean().item()
    acc_before = (before == labels[:n]).float().mean().item()
    acc_after = (after == labels[:n]).float().mean().item()
    assert agree >= 0.9 and acc_after >= acc_before - 0.05, (agree, acc_before, acc_after)
