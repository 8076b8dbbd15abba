"""``lstmlab bench`` runs tiny configurations end to end; no timing assertions."""

from __future__ import annotations

import json

import pytest

from lstmlab import cli
from lstmlab.benchmarking import BACKENDS


def test_bench_json_has_a_row_per_backend(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "--batch-sizes", "2", "3", "--seq-len", "3", "--input-size", "2", "--hidden-size", "4",
            "--repeats", "2", "--warmup", "1", "--min-samples", "1", "--mode", "both", "--json"]
    assert cli.main(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 2 * 2 * len(BACKENDS)  # modes x batch sizes x backends
    for row in rows:
        assert row["backend"] in BACKENDS
        assert row["samples_per_s"] > 0
        assert len(row["samples_per_s_all"]) == 2
        assert row["ratio_vs_torch"] > 0
    torch_rows = [r for r in rows if r["backend"] == "torch"]
    assert all(r["ratio_vs_torch"] == pytest.approx(1.0) for r in torch_rows)
    assert {(r["mode"], r["batch_size"]) for r in rows} == {(m, b) for m in ("train", "forward") for b in (2, 3)}


def test_bench_table_and_json_file(capsys: pytest.CaptureFixture[str], tmp_path) -> None:  # noqa: ANN001
    out = tmp_path / "bench.json"
    argv = ["bench", "--batch-sizes", "2", "--seq-len", "2", "--input-size", "3", "--hidden-size", "3",
            "--layers", "2", "--repeats", "1", "--warmup", "0", "--min-samples", "1", "--threads", "1",
            "--backends", "fused", "torch", "--json", str(out)]
    assert cli.main(argv) == 0
    table = capsys.readouterr().out
    lines = table.strip().splitlines()
    assert "samples/s" in lines[1] and "x torch" in lines[1]
    body = [line.split() for line in lines[2:]]
    assert [row[0] for row in body] == ["fused", "torch"]
    for row in body:
        assert float(row[3]) > 0  # samples/s
        assert row[4].endswith("x")  # ratio column
    rows = json.loads(out.read_text())
    assert [r["backend"] for r in rows] == ["fused", "torch"] and rows[0]["layers"] == 2


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--batch-sizes", "0"], "--batch-sizes"),
        (["--batch-sizes", "-4", "8"], "--batch-sizes"),
        (["--seq-len", "0"], "--seq-len"),
        (["--hidden-size", "-1"], "--hidden-size"),
        (["--repeats", "0"], "--repeats"),
        (["--warmup", "-1"], "--warmup"),
        (["--threads", "0"], "--threads"),
        (["--backends", "fast"], "unknown backend"),
        (["--device", "nonsense"], "--device"),
        (["--allocator", "jemalloc"], "--allocator"),
    ],
)
def test_bench_bad_flags_are_user_errors(capsys: pytest.CaptureFixture[str], flags: list[str], message: str) -> None:
    try:
        code = cli.main(["bench", *flags])
    except SystemExit as e:  # a flag argparse itself refuses (a choice) exits from the parser
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("lstmlab bench: error:") and message in err
    assert "Traceback" not in err


def test_bench_variants_rows_ratios_and_table(capsys: pytest.CaptureFixture[str]) -> None:
    """--variants: each variant on reference and fused, with plain nn.LSTM timed in turns with them; "x torch" is
    the ratio to that nn.LSTM, "x ref" to the same variant on the reference backend."""
    from lstmlab.benchmarking import VARIANTS, variant_label

    argv = ["bench", "--batch-sizes", "3", "--seq-len", "2", "--input-size", "2", "--hidden-size", "3",
            "--repeats", "1", "--warmup", "0", "--min-samples", "1", "--variants", "--json"]
    assert cli.main(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    labels = [variant_label(*v) for v in VARIANTS]
    assert len(set(labels)) == len(VARIANTS) and "lstm" not in labels
    assert [(r["variant"], r["backend"]) for r in rows] == [(v, b) for v in labels for b in BACKENDS]
    for variant in labels:
        group = {r["backend"]: r for r in rows if r["variant"] == variant}
        assert group["reference"]["ratio_vs_reference"] == pytest.approx(1.0)
        assert group["torch"]["ratio_vs_torch"] == pytest.approx(1.0)
        fused = group["fused"]
        assert fused["ratio_vs_torch"] == pytest.approx(fused["samples_per_s"] / group["torch"]["samples_per_s"])
        assert fused["ratio_vs_reference"] == pytest.approx(
            fused["samples_per_s"] / group["reference"]["samples_per_s"])
        assert group["torch"]["cell"] == "lstm" and group["torch"]["zoneout"] == 0.0  # plain nn.LSTM
        assert group["torch"]["recurrent_dropout"] == 0.0
    by_label = {variant_label(*v): v for v in VARIANTS}
    for r in rows:
        if r["backend"] != "torch":
            cell, zoneout, recurrent_dropout = by_label[r["variant"]]
            assert (r["cell"], r["recurrent_dropout"]) == (cell, recurrent_dropout)
            assert r["zoneout"] == (list(zoneout) if isinstance(zoneout, tuple) else zoneout)


def test_bench_one_variant_from_flags_in_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "--batch-sizes", "2", "--seq-len", "2", "--input-size", "2", "--hidden-size", "3",
            "--repeats", "1", "--warmup", "0", "--min-samples", "1", "--mode", "both", "--cell", "layernorm",
            "--zoneout", "0.1,0.05", "--recurrent-dropout", "0.25"]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "x torch" in lines[1] and "x ref" in lines[1] and lines[1].split()[-1] == "variant"
    body = [line.split() for line in lines[2:]]
    assert [(row[0], row[2]) for row in body] == [(b, m) for m in ("train", "forward") for b in BACKENDS]
    for row in body:
        assert float(row[3]) > 0 and row[4].endswith("x") and row[5].endswith("x")
        assert row[-1] == ("nn.LSTM" if row[0] == "torch" else "layernorm+zoneout=0.1,0.05+rdrop=0.25")
    assert [row[5] for row in body if row[0] == "reference"] == ["1.00x", "1.00x"]


def test_bench_without_reference_has_no_ref_ratio(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "--batch-sizes", "2", "--seq-len", "2", "--input-size", "2", "--hidden-size", "3",
            "--repeats", "1", "--warmup", "0", "--min-samples", "1", "--cell", "peephole", "--backends", "fused",
            "torch", "--json"]
    assert cli.main(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["backend"] for r in rows] == ["fused", "torch"]
    assert all(r["ratio_vs_reference"] is None and r["variant"] == "peephole" for r in rows)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--cell", "gru"], "--cell"),
        (["--zoneout", "1.5"], "zoneout should be"),
        (["--zoneout", "0.1,0.2,0.3"], "--zoneout"),
        (["--zoneout", "x"], "--zoneout"),
        (["--recurrent-dropout", "1"], "recurrent_dropout should be"),
        (["--variants", "--cell", "peephole"], "--variants"),
    ],
)
def test_bench_bad_variant_flags_are_user_errors(capsys: pytest.CaptureFixture[str], flags: list[str],
                                                 message: str) -> None:
    try:
        code = cli.main(["bench", "--batch-sizes", "2", "--seq-len", "2", *flags])
    except SystemExit as e:
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("lstmlab bench: error:") and message in err
    assert "Traceback" not in err


def test_bench_with_a_warm_allocator_says_so(tmp_path) -> None:  # noqa: ANN001
    """--allocator warm changes glibc's thresholds for the whole process: run it in a process of its own."""
    import subprocess
    import sys

    argv = [sys.executable, "-m", "lstmlab", "bench", "--batch-sizes", "2", "--seq-len", "2", "--input-size", "2",
            "--hidden-size", "3", "--repeats", "1", "--warmup", "0", "--min-samples", "1", "--threads", "1",
            "--backends", "fused", "torch", "--allocator", "warm", "--json", str(tmp_path / "b.json")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "allocator=warm" in done.stdout.splitlines()[0]
    rows = json.loads((tmp_path / "b.json").read_text())
    assert [r["allocator"] for r in rows] == ["warm", "warm"]


def test_bench_infer_mode_from_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "--batch-sizes", "2", "--seq-len", "3", "--input-size", "2", "--hidden-size", "4",
            "--repeats", "1", "--warmup", "0", "--min-samples", "1", "--mode", "infer", "--bidirectional",
            "--backends", "fused", "torch", "int8", "--json"]
    assert cli.main(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["backend"], r["mode"], r["bidirectional"]) for r in rows] == [
        (b, "infer", True) for b in ("fused", "torch", "int8")]


def test_bench_serving_backends_refuse_training(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "--batch-sizes", "2", "--seq-len", "2", "--backends", "int8", "torch"]) == 2
    assert "inference only" in capsys.readouterr().err
