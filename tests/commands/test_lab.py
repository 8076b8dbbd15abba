"""Issue 11, "a lab a learner enjoys": one test per friction point a new user hit, asserting the new behaviour.

Runs are tiny (a few iterations of a small model) on the data the ``mnist_dir`` fixture provides."""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from cli_run import run_cli

from lstmlab.cli import COMMANDS, VERSION, build_parser, main

REPO = Path(__file__).resolve().parents[2]
SMALL = ["--quiet", "--batch-size", "32", "--hidden-size", "8", "--val-size", "500", "--device", "cpu"]


_run = run_cli


def _one_line_error(code: int, err: str, *needles: str) -> str:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def small_run(mnist_dir, tmp_path_factory) -> Path:
    """A finished 12-iteration run (evaluations at 6 and 12) trained with --data-dir."""
    out = tmp_path_factory.mktemp("lab") / "run"
    assert main(["train", *SMALL, "--iterations", "12", "--eval-every", "6", "--data-dir", str(mnist_dir),
                 "--out", str(out)]) == 0
    return out


# ---------------------------------------------------------------------------------------------
# 1. runs remember their data; every command that takes a run takes its folder or any checkpoint in it


def test_run_remembers_its_data_folder(small_run, mnist_dir):
    for name in ("run.json", "summary.json"):
        assert json.loads((small_run / name).read_text())["data_dir"] == str(Path(mnist_dir).resolve())


def test_evaluate_takes_a_run_folder_or_a_checkpoint_and_uses_the_runs_data(small_run, capsys, monkeypatch,
                                                                            tmp_path):
    # with no LSTMLAB_DATA and an empty cache, only the run's own memory can find the data
    monkeypatch.delenv("LSTMLAB_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    results = []
    for target in (small_run, small_run / "best.safetensors"):
        code, out, err = _run(capsys, "evaluate", str(target), "--json")
        assert code == 0, err
        assert "downloading" not in err
        results.append(json.loads(out))
    assert results[0]["accuracy"] == results[1]["accuracy"]
    assert results[0]["checkpoint"].endswith("best.safetensors")
    code, out, err = _run(capsys, "evaluate", str(small_run / "last.safetensors"))
    assert code == 0 and "Test Accuracy" in out


def test_plot_needs_data_only_for_the_mistakes(small_run, capsys, monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    monkeypatch.delenv("LSTMLAB_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    out = tmp_path / "figs"
    code, printed, err = _run(capsys, "plot", str(small_run / "best.safetensors"), "--out-dir", str(out))
    assert code == 0, err
    assert {p.name for p in out.iterdir()} == {"curves.png", "confusion.png", "mistakes.png"}

    # a run whose data folder is gone: the curves and confusion matrix still come, mistakes.png is skipped
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("run.json", "summary.json", "metrics.csv", "losses.csv", "best.safetensors"):
        text = (small_run / name).read_bytes()
        if name.endswith(".json"):
            info = json.loads(text)
            info["data_dir"] = str(tmp_path / "gone")
            text = json.dumps(info).encode()
        (moved / name).write_bytes(text)
    monkeypatch.setattr("lstmlab.data.registry.DATASETS", _no_mirrors(), raising=True)
    out2 = tmp_path / "figs2"
    code, printed, err = _run(capsys, "plot", str(moved), "--out-dir", str(out2))
    assert code == 0, err
    assert {p.name for p in out2.iterdir()} == {"curves.png", "confusion.png"}
    assert "skipped mistakes.png" in err


def _no_mirrors():
    """The dataset table with no download mirrors, so that a test never reaches the network."""
    from dataclasses import replace

    from lstmlab.data import DATASETS

    return {name: replace(info, mirrors=()) for name, info in DATASETS.items()}


# ---------------------------------------------------------------------------------------------
# 2. LSTMLAB_DATA pointing at MNIST does not block Fashion-MNIST; the offline error names the Debian package


def _fashion_system_dir(monkeypatch, folder):
    """The registry with Fashion-MNIST's system folder moved to ``folder``."""
    from dataclasses import replace

    from lstmlab.data import registry

    table = dict(registry.DATASETS)
    table["fashion-mnist"] = replace(table["fashion-mnist"], system_dir=folder)
    monkeypatch.setattr(registry, "DATASETS", table)


def test_lstmlab_data_for_mnist_does_not_block_fashion(mnist_dir, real_mnist, monkeypatch, tmp_path):
    from lstmlab import data

    if not real_mnist:
        pytest.skip("telling MNIST's folder apart needs the real MNIST test labels")
    fashion = tmp_path / "system-fashion"
    fashion.mkdir()
    for base in data.DATASETS["fashion-mnist"].files:
        (fashion / base).write_bytes(b"")  # only their presence matters to the resolver
    _fashion_system_dir(monkeypatch, fashion)
    monkeypatch.setenv("LSTMLAB_DATA", str(mnist_dir))
    assert data.resolve_data_dir("fashion-mnist", download=False) == fashion
    assert data.resolve_data_dir("mnist", download=False) == Path(mnist_dir)


def test_offline_fashion_error_names_the_debian_package(monkeypatch, tmp_path):
    from lstmlab import data
    from lstmlab.errors import LstmlabError

    monkeypatch.setenv("LSTMLAB_DATA", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _fashion_system_dir(monkeypatch, tmp_path / "no-package")
    with pytest.raises(LstmlabError) as e:
        data.resolve_data_dir("fashion-mnist", mirrors=[], quiet=True)
    assert "apt-get install dataset-fashion-mnist" in str(e.value)
    assert "LSTMLAB_DATA" in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# 5. evaluate --split train/val/test, each with its own header


def test_evaluate_splits_have_their_own_header(small_run, capsys):
    for split, title, count in (("train", "Train", None), ("val", "Validation", 500), ("test", "Test", None)):
        code, out, err = _run(capsys, "evaluate", str(small_run), "--split", split)
        assert code == 0, err
        assert f"{title} Loss" in out and f"{title} Accuracy" in out
        if split != "test":
            assert "Test" not in out
        if count:
            assert f"{count} val images" in out
    code, out, _ = _run(capsys, "evaluate", str(small_run), "--split", "val", "--json")
    # the run's own validation split: the same accuracy as its last evaluation logged
    rows = list(csv.DictReader((small_run / "metrics.csv").open()))
    best = json.loads((small_run / "summary.json").read_text())["best_val_accuracy"]
    assert json.loads(out)["accuracy"] == pytest.approx(best)
    assert rows


# ---------------------------------------------------------------------------------------------
# 6. gates: 1-based --layer as in the title; the title names the run; units ordered, the order stated


def test_gates_layer_is_one_based_and_title_names_the_run(small_run, capsys, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "g.png"
    code, printed, err = _run(capsys, "gates", str(small_run), "--index", "0", "--layer", "1", "--out", str(out))
    assert code == 0, err
    assert out.stat().st_size > 0
    _one_line_error(*_run(capsys, "gates", str(small_run), "--index", "0", "--layer", "2", "--out", str(out))[::2],
                    "--layer 2", "1..1")
    _one_line_error(*_run(capsys, "gates", str(small_run), "--index", "0", "--layer", "0", "--out", str(out))[::2],
                    "--layer 0")


def test_gates_figure_title_and_unit_order(small_run):
    pytest.importorskip("matplotlib")
    import numpy as np

    from lstmlab.analysis.gates import UNIT_ORDERS, GatesFigure, unit_order
    from lstmlab.analysis.recording import record
    from lstmlab.checkpoint import load_checkpoint
    from lstmlab.runs import run_name

    ckpt = load_checkpoint(small_run / "best.safetensors")
    x = __import__("torch").rand(1, 28, 28)
    rec = record(ckpt.model, x)
    order = unit_order(rec.get(-1), 0, "change")
    assert sorted(order.tolist()) == list(range(8))
    layer = rec.get(-1)
    change = sum(layer[g][0].diff(dim=0).abs() for g in "ifgo")  # (T-1, H)
    when = change.argmax(dim=0).numpy()[order]
    assert (np.diff(when) >= 0).all()  # earliest change first
    fig = GatesFigure(rec, (x[0] * 255).byte(), "rows", [str(k) for k in range(10)], title=f"run {run_name(small_run)}",
                      order="change")
    assert small_run.name in fig.fig._suptitle.get_text()
    labels = {ax.get_ylabel() for ax in fig.fig.axes}
    assert UNIT_ORDERS["change"] in labels


def test_gates_figure_counts_steps_rows_and_columns_from_one(small_run):
    pytest.importorskip("matplotlib")
    import torch

    from lstmlab.analysis.gates import GatesFigure
    from lstmlab.analysis.recording import record
    from lstmlab.checkpoint import load_checkpoint

    ckpt = load_checkpoint(small_run / "best.safetensors")
    x = torch.rand(1, 28, 28)
    rec = record(ckpt.model, x)
    names = [str(k) for k in range(10)]
    last = GatesFigure(rec, (x[0] * 255).byte(), "rows", names)  # default: the last step
    first = GatesFigure(rec, (x[0] * 255).byte(), "rows", names, step=1)
    titles = [ax.get_title() for ax in last.fig.axes]
    assert any("step 28 reads row 28" in t for t in titles)
    assert any("step 1 reads row 1" in ax.get_title() for ax in first.fig.axes)
    for heat in last.heat.values():  # every time axis: 1 .. 28
        labels = [t.get_text() for t in heat.axes.get_xticklabels()]
        assert labels[0] == "1" and labels[-1] == "28"
    pixel = GatesFigure(rec, (x[0] * 255).byte(), "pixels", names, step=2)  # step 2 reads pixel index 1
    assert any("step 2 reads row 1, column 2" in ax.get_title() for ax in pixel.fig.axes)


def test_gates_figure_unit_labels_follow_a_new_recording(small_run):
    pytest.importorskip("matplotlib")
    import torch

    from lstmlab.analysis.gates import GatesFigure, unit_order
    from lstmlab.analysis.recording import record
    from lstmlab.checkpoint import load_checkpoint

    ckpt = load_checkpoint(small_run / "best.safetensors")
    names = [str(k) for k in range(10)]
    torch.manual_seed(3)
    recs = [record(ckpt.model, torch.rand(1, 28, 28)) for _ in range(6)]
    orders = [unit_order(r.get(-1), 0, "change") for r in recs]
    b = next(k for k in range(1, 6) if (orders[k] != orders[0]).any())  # a drawing whose units sort differently
    image = torch.zeros(28, 28, dtype=torch.uint8)

    def row_labels(fig: GatesFigure) -> list[str]:
        return [t.get_text() for t in next(iter(fig.heat.values())).axes.get_yticklabels()]

    labelled = GatesFigure(recs[0], image, "rows", names, order="change")
    labelled.to_array()
    labelled.update(recs[b], image)
    labelled.to_array()
    ticks = list(range(0, 8, 1))
    assert row_labels(labelled) == [str(int(orders[b][t])) for t in ticks]  # the new order's units, not the first's
    plain = GatesFigure(recs[0], image, "rows", names, order="change", unit_labels=False)
    assert row_labels(plain) == []  # no unit numbers that a new drawing would make stale
    values = next(iter(plain.update(recs[b], image).heat.values())).get_array()
    first = next(iter(recs[b].get(-1)[g] for g in "i"))[0].T.numpy()[orders[b]]
    assert abs(values - first).max() < 1e-6  # the heatmap rows follow the new order


# ---------------------------------------------------------------------------------------------
# 7. help and CLI consistency


def _all_actions():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        for action in p._actions:
            yield name, p, action


def test_every_option_has_help_and_a_shown_default():
    from lstmlab.cli import HelpFormatter

    for name, _, action in _all_actions():
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"lstmlab {name} {action.option_strings[0]} has no help"
        if action.nargs == 0:  # a switch: off unless given
            continue
        shown = HelpFormatter("x")._get_help_string(action)
        assert "default" in shown, f"lstmlab {name} {action.option_strings[0]} shows no default: {shown!r}"


def test_choices_positionals_and_device_are_consistent():
    from lstmlab.cli import HelpFormatter

    devices = set()
    for name, _, action in _all_actions():
        if not action.option_strings:
            metavar = action.metavar or action.dest
            assert metavar == metavar.upper(), f"lstmlab {name}: positional {metavar} not in capitals"
        if "--device" in action.option_strings:  # train's is None in the parser (the recipe's), shown as auto
            shown = HelpFormatter("x")._get_help_string(action)
            devices.add(("auto" if "(default: auto)" in shown else action.default, tuple(action.choices or ())))
    assert devices == {("auto", ("auto", "cpu", "cuda"))}
    train = {a.dest: a for _, p, a in _all_actions() if p.prog.endswith("train")}
    for dest in ("dataset", "view", "normalize", "backend", "optimizer", "schedule", "device"):
        assert train[dest].choices, f"train --{dest} takes a free string"


def test_bare_lstmlab_lists_the_commands(capsys):
    code, out, err = _run(capsys)
    assert code == 0 and err == ""
    for command in COMMANDS:
        assert command in out


def test_help_does_not_import_torch():
    code = ("import sys; from lstmlab.cli import main\n"
            "for argv in (['--help'], ['train', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "main([])\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "train" in done.stdout and "--hidden-size" in done.stdout


def test_version_matches_the_package():
    import lstmlab

    assert VERSION == lstmlab.__version__


# ---------------------------------------------------------------------------------------------
# 8. --dry-run says so, keeps nothing without --out, honours --iterations


def test_dry_run_says_so_keeps_nothing_and_honours_iterations(mnist_dir, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = _run(capsys, "train", "--dry-run", "--batch-size", "16", "--hidden-size", "8",
                          "--data-dir", str(mnist_dir), "--device", "cpu")
    assert code == 0, err
    assert "DRY RUN" in out and "not a real result" in out
    assert "Nothing was kept" in out
    assert not (tmp_path / "runs").exists() and list(tmp_path.iterdir()) == []

    out_dir = tmp_path / "kept"
    code, out, err = _run(capsys, "train", "--dry-run", "--quiet", "--batch-size", "16", "--hidden-size", "8",
                          "--iterations", "5", "--eval-every", "2", "--data-dir", str(mnist_dir), "--out",
                          str(out_dir))
    assert code == 0, err
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["iterations"] == 5 and summary["dry_run"] is True
    assert json.loads((out_dir / "run.json").read_text())["dry_run"] is True


# ---------------------------------------------------------------------------------------------
# 9. the end of training: files once, last.safetensors listed, accuracy once, next steps


def test_end_of_training_message(mnist_dir, capsys, tmp_path):
    out_dir = tmp_path / "r"
    code, out, err = _run(capsys, "train", *[a for a in SMALL if a != "--quiet"], "--iterations", "4",
                          "--eval-every", "2", "--data-dir", str(mnist_dir), "--out", str(out_dir))
    assert code == 0, err
    saved = [line for line in out.splitlines() if line.startswith("Saved")]
    assert len(saved) == 1 and saved[0].count(str(out_dir)) == 1
    assert "last.safetensors" in saved[0] and "best.safetensors" in saved[0]
    report = out[out.index("Test Loss"):]
    assert report.count("Accuracy") == 1 and "%" in report  # the test accuracy, once
    for hint in (f"lstmlab plot {out_dir}", f"lstmlab gates {out_dir}", "lstmlab demo"):
        assert hint in out


# ---------------------------------------------------------------------------------------------
# 10. short runs: the training loss at a finer grain, drawn in the curves; a note when too few points


def test_short_runs_log_the_loss_finely(small_run):
    rows = list(csv.DictReader((small_run / "losses.csv").open()))
    assert [int(r["iteration"]) for r in rows] == list(range(1, 13))  # eval_every 6 -> every step
    assert len(list(csv.DictReader((small_run / "metrics.csv").open()))) == 2


def test_curves_use_the_fine_loss_and_note_too_few_points(small_run):
    pytest.importorskip("matplotlib")
    from lstmlab.analysis.figures import curves_figure, read_losses, read_metrics

    metrics = read_metrics(small_run / "metrics.csv")
    losses = read_losses(small_run / "losses.csv")
    fig = curves_figure(metrics, "t", losses)
    loss_ax, acc_ax = fig.axes[:2]
    assert len(loss_ax.lines[0].get_xdata()) == 12
    assert any("evaluation" in t.get_text() for t in acc_ax.texts)


# ---------------------------------------------------------------------------------------------
# 11. Ctrl-C: on its own line, saying what was kept


def test_interrupt_line_says_what_is_kept(tmp_path):
    from lstmlab.training.stopping import interrupted

    class Stub:
        saved_iter, total = 500, 2000
        at = SimpleNamespace(iteration=730)

    line = interrupted(Stub(), tmp_path, KeyboardInterrupt()).message
    assert "keeps the checkpoint of iteration 500" in line and "last.safetensors" in line
    assert f"lstmlab train --resume {tmp_path}" in line


def test_interrupt_line_starts_a_new_line_on_a_terminal(monkeypatch, capsys):
    from lstmlab.commands import train

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    train._say_interrupted("interrupted at iteration 3")
    err = capsys.readouterr().err
    assert err.startswith("\nlstmlab train: interrupted")


# ---------------------------------------------------------------------------------------------
# 12. the first run says the native loops are compiling


def test_native_build_note(monkeypatch):
    import torch

    from lstmlab.nn import _native
    from lstmlab.training.report import native_build_note

    monkeypatch.setattr(_native, "verify", lambda path: "missing")
    note = native_build_note("fused", torch.device("cpu"))
    assert note is not None and "compiling" in note and "\n" not in note
    assert native_build_note("torch", torch.device("cpu")) is None
    monkeypatch.setenv("LSTMLAB_NATIVE", "0")
    assert native_build_note("fused", torch.device("cpu")) is None
    monkeypatch.delenv("LSTMLAB_NATIVE")
    monkeypatch.setattr(_native, "verify", lambda path: None)
    assert native_build_note("fused", torch.device("cpu")) is None


# ---------------------------------------------------------------------------------------------
# 13. README


def test_readme_top_has_the_cpu_wheel_tip_and_the_flag_table_has_quiet():
    text = (REPO / "README.md").read_text()
    top = text[: text.index("## ")]
    assert "download.pytorch.org/whl/cpu" in top
    assert "README.ko.md" in top
    assert "| `--quiet` |" in text


# ---------------------------------------------------------------------------------------------
# 14. the smaller ones


def test_quiet_still_prints_the_test_accuracy(mnist_dir, capsys, tmp_path):
    code, out, err = _run(capsys, "train", *SMALL, "--iterations", "2", "--data-dir", str(mnist_dir), "--out",
                          str(tmp_path / "q"))
    assert code == 0 and err == ""
    assert len(out.strip().splitlines()) == 1 and "Test Accuracy" in out


def test_summary_confusion_rows_on_one_line_each(small_run):
    text = (small_run / "summary.json").read_text()
    confusion = json.loads(text)["confusion_matrix"]
    for row in confusion:
        assert json.dumps(row) in text


def test_header_names_the_schedule(mnist_dir, capsys, tmp_path):
    code, out, err = _run(capsys, "train", *[a for a in SMALL if a != "--quiet"], "--recipe", "seed",
                          "--iterations", "2", "--data-dir", str(mnist_dir), "--out", str(tmp_path / "h"))
    assert code == 0, err
    assert "sgd lr 0.1 (constant lr)" in out


def test_gates_out_jpg_is_a_jpeg(small_run, capsys, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "g.jpg"
    code, _, err = _run(capsys, "gates", str(small_run), "--index", "0", "--out", str(out))
    assert code == 0, err
    assert out.read_bytes()[:3] == b"\xff\xd8\xff"


# ---------------------------------------------------------------------------------------------
# TensorBoard


def test_tensorboard_scalars_and_gate_histograms(mnist_dir, capsys, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out_dir = tmp_path / "tb"
    code, _, err = _run(capsys, "train", *SMALL, "--iterations", "4", "--eval-every", "2", "--tensorboard",
                        "--data-dir", str(mnist_dir), "--out", str(out_dir))
    assert code == 0, err
    events = EventAccumulator(str(out_dir / "tensorboard"), size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    for tag in ("loss/train", "loss/val", "accuracy/val", "lr"):
        assert tag in tags["scalars"], tags
    assert [e.step for e in events.Scalars("accuracy/val")] == [2, 4]
    for gate in ("i", "f", "g", "o"):
        histograms = events.Histograms(f"gates_layer1/{gate}")
        assert [h.step for h in histograms] == [2, 4]
        assert 0 < histograms[0].histogram_value.min <= histograms[0].histogram_value.max < 1 or gate == "g"


def test_tensorboard_missing_is_one_line(monkeypatch, mnist_dir, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were not installed
    code, _, err = _run(capsys, "train", *SMALL, "--iterations", "2", "--tensorboard", "--data-dir",
                        str(mnist_dir), "--out", str(tmp_path / "x"))
    _one_line_error(code, err, "pip install 'lstmlab[tensorboard]'")
    assert not (tmp_path / "x").exists()

