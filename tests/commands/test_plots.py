"""Figures: ``lstmlab gates`` and ``lstmlab plot`` write readable PNGs, and refuse bad input in one line."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from trained import trained_run

from lstmlab.cli import main
from lstmlab.config import ModelConfig
from lstmlab.errors import LstmlabError
from lstmlab.model import SequenceClassifier

pytest.importorskip("matplotlib")
Image = pytest.importorskip("PIL.Image")

MIN_STD = 20.0  # grey-level standard deviation of a figure with content; a blank or one-colour PNG is far below


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory, mnist_dir: Path) -> Path:
    return trained_run(tmp_path_factory.getbasetemp(), mnist_dir)


def assert_figure(path: Path, size: tuple[int, int], min_std: float = MIN_STD) -> None:
    """A PNG of exactly ``size`` (width, height) pixels, with content, and no temp file left beside it."""
    assert path.is_file()
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size == size
        grey = np.asarray(img.convert("L"), dtype=np.float64)
    assert grey.std() > min_std, f"{path.name} looks blank (std {grey.std():.1f})"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")]


def _cli_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"lstmlab {argv[0]}: error: ") and "\n" not in err
    return err


# ---------------------------------------------------------------------------------------------
# gates


def _a_one() -> torch.Tensor:
    """A drawn "1", uint8 (28, 28)."""
    image = torch.zeros(28, 28, dtype=torch.uint8)
    image[6:22, 12:16] = 255
    return image


@pytest.mark.parametrize(("view", "bidirectional", "layers"), [("rows", False, 2), ("rows", True, 1),
                                                               ("pixels", True, 1), ("permuted", False, 1)])
def test_gates_figure_any_model(tmp_path: Path, view: str, bidirectional: bool, layers: int) -> None:
    from lstmlab.analysis.figures import save_figure
    from lstmlab.analysis.gates import gates_figure
    from lstmlab.analysis.recording import record

    torch.manual_seed(0)
    steps, inputs = (28, 28) if view == "rows" else (784, 1)
    model = SequenceClassifier(ModelConfig(input_size=inputs, hidden_size=12, num_layers=layers,
                                           bidirectional=bidirectional, backend="torch")).eval()
    image = _a_one()
    x = (image.float() / 255).reshape(1, steps, inputs)
    rec = record(model, x)
    if view == "pixels" and bidirectional:
        assert rec.probs is None  # 784 prefixes of a bidirectional model are not re-run
    perm = torch.randperm(784) if view == "permuted" else None
    fig = gates_figure(rec, image, view, [str(k) for k in range(10)], direction=1 if bidirectional else 0,
                       step=5, permutation=perm, title="test")
    assert_figure(save_figure(fig, tmp_path / "g.png"), (1700, 1200))


def test_gates_figure_refuses_bad_step() -> None:
    from lstmlab.analysis.gates import gates_figure
    from lstmlab.analysis.recording import record

    model = SequenceClassifier(ModelConfig(hidden_size=8, backend="reference")).eval()
    rec = record(model, torch.zeros(1, 28, 28))
    with pytest.raises(LstmlabError, match="--step must be in 1..28"):
        gates_figure(rec, torch.zeros(28, 28, dtype=torch.uint8), "rows", list("0123456789"), step=0)


def test_gates_cli(run_dir: Path, mnist_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = str(run_dir / "best.safetensors")
    out = tmp_path / "figs" / "gates.png"
    assert main(["gates", ckpt, "--index", "0", "--data-dir", str(mnist_dir), "--out", str(out), "--step", "10"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    assert_figure(out, (1700, 1200))

    drawn = tmp_path / "seven.png"
    img = Image.new("L", (200, 200), 255)
    from PIL import ImageDraw

    ImageDraw.Draw(img).line([(40, 30), (160, 30), (80, 180)], fill=0, width=14)
    img.save(drawn)
    out2 = tmp_path / "mine.png"
    assert main(["gates", ckpt, "--image", str(drawn), "--out", str(out2)]) == 0
    assert_figure(out2, (1700, 1200))

    err = _cli_error(["gates", ckpt, "--index", "10000", "--data-dir", str(mnist_dir), "--out", str(out)], capsys)
    assert "--index 10000 is out of range: the test split of mnist has" in err
    err = _cli_error(["gates", ckpt, "--index", "-1", "--data-dir", str(mnist_dir)], capsys)
    assert "out of range" in err
    err = _cli_error(["gates", ckpt, "--index", "0", "--data-dir", str(mnist_dir), "--layer", "3"], capsys)
    assert "--layer 3 is out of range" in err and "has 1 layer" in err
    err = _cli_error(["gates", ckpt, "--index", "0", "--data-dir", str(mnist_dir), "--direction", "reverse"], capsys)
    assert "bidirectional" in err
    err = _cli_error(["gates", ckpt, "--image", str(tmp_path / "nope.png")], capsys)
    assert "does not exist" in err
    err = _cli_error(["gates", ckpt, "--index", "0", "--data-dir", str(mnist_dir), "--out", str(tmp_path)], capsys)
    assert "is a folder" in err


DIGITS = [str(k) for k in range(10)]


def _variant_model(**variant: object) -> SequenceClassifier:
    torch.manual_seed(0)
    return SequenceClassifier(ModelConfig(hidden_size=12, backend="reference", **variant)).eval()


@pytest.mark.parametrize(("variant", "own", "phrase", "height"), [
    ({"cell": "peephole"}, ["peep_i", "peep_f", "peep_o"], "peephole into f: p_f · c", 1600),
    ({"cell": "layernorm", "zoneout": 0.1}, ["z_f", "c_norm", "zone_c", "zone_h"], "LN(c')", 2000),
    ({"zoneout": [0.2, 0.1]}, ["zone_c", "zone_h"], "zoneout on c: z_c · (c − c')", 1600),
    ({"recurrent_dropout": 0.3}, [], "", 1200),  # nothing of its own in eval: the plain figure
    ({}, [], "", 1200),
])
def test_gates_figure_of_a_variant(tmp_path: Path, variant: dict, own: list[str], phrase: str, height: int) -> None:
    """A variant's own terms get panels below the six gates, titled by what they are, steps counted from 1 and units
    in the figure's order; the plain cell keeps exactly its six panels and size."""
    from lstmlab.analysis.figures import save_figure
    from lstmlab.analysis.gates import PANELS, VARIANT_PANELS, GatesFigure, unit_order
    from lstmlab.analysis.recording import record

    image = _a_one()
    rec = record(_variant_model(**variant), (image.float() / 255)[None], zoneout="sample",
                 generator=torch.Generator().manual_seed(0))
    figure = GatesFigure(rec, image, "rows", DIGITS, step=5, order="change")
    assert list(figure.heat) == [*PANELS, *own]
    titles = [figure.heat[name].axes.get_title() for name in own]
    assert titles == [VARIANT_PANELS[name][0] for name in own]
    assert any(t.startswith(phrase) for t in titles) == bool(own)  # titles that say what each panel is
    rows = unit_order(rec.get(), 0, "change")
    for name in own:
        ax = figure.heat[name].axes
        labels = [t.get_text() for t in ax.get_xticklabels()]
        assert labels[0] == "1" and labels[-1] == "28" and ax.lines[0].get_xdata()[0] == 4  # step 5 marked
        np.testing.assert_array_equal(figure.heat[name].get_array(), rec.get()[name][0].numpy().T[rows])
    assert ("zoneout masks drawn as in training" in figure.fig.get_suptitle()) == ("zone_c" in own)
    assert_figure(save_figure(figure.fig, tmp_path / "v.png"), (1700, height))


def test_variant_gates_figure_refills_like_a_new_one() -> None:
    """update and to_array (the demo's blitting path) with a variant's panels: the pixels of a new figure."""
    from lstmlab.analysis.figures import figure_to_array
    from lstmlab.analysis.gates import GatesFigure
    from lstmlab.analysis.recording import record

    model = _variant_model(cell="layernorm", zoneout=0.2)
    one, other = _a_one(), _a_one().T.contiguous()
    recs = [record(model, (image.float() / 255)[None]) for image in (one, other)]
    options = {"dpi": 40, "live_title": False, "order": "change", "unit_labels": False}
    figure = GatesFigure(recs[0], one, "rows", DIGITS, **options)
    figure.to_array()
    again = figure.update(recs[1], other).to_array()
    assert np.array_equal(again, GatesFigure(recs[1], other, "rows", DIGITS, **options).to_array())
    drawn = figure_to_array(GatesFigure(recs[1], other, "rows", DIGITS, **options).fig)
    assert (np.abs(again.astype(int) - drawn.astype(int)).max(-1) > 40).mean() < 0.01  # but anti-aliased edges
    with pytest.raises(ValueError, match="same model shape and variant"):
        figure.update(record(_variant_model(), (other.float() / 255)[None]), other)


def test_gates_cli_draws_sampled_zoneout(tmp_path: Path) -> None:
    from lstmlab.checkpoint import save_checkpoint
    from lstmlab.config import Config, DataConfig

    config = Config(model=ModelConfig(hidden_size=12, zoneout=0.3), data=DataConfig(mean=0.13, std=0.31))
    torch.manual_seed(0)
    ckpt = tmp_path / "zoneout.safetensors"
    save_checkpoint(ckpt, SequenceClassifier(config.model), config, None)
    Image.fromarray(_a_one().numpy()).save(tmp_path / "one.png")
    pictures = {}
    for mode in ("expected", "sample"):
        out = tmp_path / f"{mode}.png"
        assert main(["gates", str(ckpt), "--image", str(tmp_path / "one.png"), "--zoneout", mode, "--seed", "3",
                     "--out", str(out)]) == 0
        assert_figure(out, (1700, 1600))
        pictures[mode] = np.asarray(Image.open(out))
    assert not np.array_equal(pictures["expected"], pictures["sample"])


# ---------------------------------------------------------------------------------------------
# plot RUN_DIR


def test_plot_run(run_dir: Path, mnist_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "plots"
    argv = ["plot", str(run_dir), "--data-dir", str(mnist_dir), "--out-dir", str(out), "--max-mistakes", "20"]
    assert main(argv) == 0
    printed = capsys.readouterr().out.split()
    for name in ("curves.png", "confusion.png", "mistakes.png"):
        assert str(out / name) in printed
    assert_figure(out / "curves.png", (1300, 500))
    assert_figure(out / "confusion.png", (900, 800))
    # 20 mistakes: 3 rows of 8, 190 px each plus a 60-px title (fewer when a model trained on the small synthetic
    # stand-in makes fewer than 20)
    summary = json.loads((run_dir / "summary.json").read_text())
    confusion = summary["confusion_matrix"]
    wrong = sum(map(sum, confusion)) - sum(confusion[k][k] for k in range(len(confusion)))
    rows = max(1, math.ceil(min(20, wrong) / 8))
    # With no mistakes at all the figure holds only text (std ~19); a blank PNG is ~0.
    assert_figure(out / "mistakes.png", (1280, 60 + 190 * rows), MIN_STD if wrong else 10.0)


def test_plot_refuses_missing_and_damaged_runs(run_dir: Path, mnist_dir: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "run"
    shutil.copytree(run_dir, bad)
    assert "does not exist" in _cli_error(["plot", str(tmp_path / "nothing")], capsys)
    argv = ["plot", str(bad), "--data-dir", str(mnist_dir), "--out-dir", str(tmp_path / "out")]

    metrics = (bad / "metrics.csv").read_text()
    (bad / "metrics.csv").write_text(metrics.replace("iteration", "step", 1))
    assert "lacks the column(s) iteration" in _cli_error(argv, capsys)
    lines = metrics.splitlines()
    row = lines[1].split(",")
    row[lines[0].split(",").index("train_loss")] = "oops"
    (bad / "metrics.csv").write_text("\n".join([lines[0], ",".join(row)]) + "\n")
    assert "not a number; the file is damaged" in _cli_error(argv, capsys)
    (bad / "metrics.csv").write_text(lines[0] + "\n")
    assert "holds no rows" in _cli_error(argv, capsys)
    (bad / "metrics.csv").unlink()
    assert "metrics.csv is missing" in _cli_error(argv, capsys)
    (bad / "metrics.csv").write_text(metrics)

    summary = (bad / "summary.json").read_text()
    (bad / "summary.json").write_text(summary[: len(summary) // 2])
    assert "not readable JSON" in _cli_error(argv, capsys)
    (bad / "summary.json").write_text('{"confusion_matrix": [[1, 2], [3]]}')
    assert "no square confusion_matrix" in _cli_error(argv, capsys)
    (bad / "summary.json").unlink()
    assert "summary.json is missing" in _cli_error(argv, capsys)
    (bad / "summary.json").write_text(summary)

    (bad / "best.safetensors").unlink()
    assert "best.safetensors is missing" in _cli_error(argv, capsys)
    (bad / "best.safetensors").write_bytes(b"\0" * 100)
    assert "not a readable lstmlab checkpoint" in _cli_error(argv, capsys)
    assert not (tmp_path / "out").exists()  # nothing written by a failed run
