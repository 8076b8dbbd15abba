"""ONNX: lstmlab.LSTM exports as ONNX's own LSTM operator and runs in onnxruntime at any batch and sequence length;
`lstmlab export` writes a whole classifier and `lstmlab predict model.onnx IMAGE` answers as the checkpoint does."""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from trained import trained_run

from lstmlab.cli import main
from lstmlab.nn.lstm import LSTM

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(bidirectional=True), dict(num_layers=2, bidirectional=True), dict(bias=False, num_layers=2)],
    ids=["plain", "bidirectional", "2-layer-bidirectional", "no-bias"],
)
@pytest.mark.parametrize("batch_first", [False, True])
def test_lstm_round_trip_in_onnxruntime(kwargs: dict, batch_first: bool):
    torch.manual_seed(0)
    m = LSTM(3, 5, batch_first=batch_first, **kwargs).eval()
    x = torch.randn(2, 4, 3)
    axes = {0: "B", 1: "T"} if batch_first else {0: "T", 1: "B"}
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        torch.onnx.export(m, (x,), f, dynamo=False, input_names=["x"], output_names=["y", "h", "c"],
                          dynamic_axes={"x": axes, "y": axes, "h": {1: "B"}, "c": {1: "B"}})
        logging.disable(logging.NOTSET)
    graph = onnx.load_from_string(f.getvalue())
    assert "LSTM" in {n.op_type for n in graph.graph.node}
    session = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"])
    for shape in [(7, 9, 3), (1, 1, 3), (3, 30, 3)]:  # none of them the traced (2, 4)
        x2 = torch.randn(shape)
        got = session.run(None, {"x": x2.numpy()})
        with torch.no_grad():
            out, (h, c) = m(x2)
        for a, b in zip(got, (out, h, c), strict=True):
            np.testing.assert_allclose(a, b.numpy(), atol=1e-5, rtol=1e-5)


def test_default_exporter_writes_the_onnx_lstm_operator():
    m = LSTM(3, 5, batch_first=True).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        program = torch.onnx.export(m, (torch.randn(2, 4, 3),), dynamo=True, verbose=False)
        logging.disable(logging.NOTSET)
    assert "LSTM" in {n.op_type for n in program.model_proto.graph.node}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, mnist_dir: Path) -> Path:
    return trained_run(tmp_path_factory.getbasetemp(), mnist_dir)


def test_export_and_predict_with_onnxruntime(run_dir: Path, mnist_dir: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture):
    from PIL import Image

    from lstmlab.data import load_dataset

    out = tmp_path / "model.onnx"
    assert main(["export", str(run_dir / "best.safetensors"), str(out)]) == 0
    assert "onnxruntime agrees" in capsys.readouterr().out
    graph = onnx.load(str(out))
    assert "LSTM" in {n.op_type for n in graph.graph.node}
    test = load_dataset("mnist", "test", data_dir=mnist_dir, download=False)
    images = []
    for k in range(4):
        path = tmp_path / f"digit{k}.png"
        Image.fromarray(test[0][k].numpy()).save(path)
        images.append(str(path))
    assert main(["predict", str(run_dir / "best.safetensors"), *images]) == 0
    want = capsys.readouterr().out
    assert main(["predict", str(out), *images]) == 0
    got = capsys.readouterr().out
    assert [line.split("(")[0] for line in got.splitlines()] == [line.split("(")[0] for line in want.splitlines()]


def test_predict_refuses_an_onnx_file_lstmlab_did_not_write(tmp_path: Path, capsys: pytest.CaptureFixture):
    bogus = tmp_path / "bogus.onnx"
    bogus.write_bytes(b"not a model")
    image = tmp_path / "x.png"
    image.write_bytes(b"")
    code = main(["predict", str(bogus), str(image)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "bogus.onnx" in err


def test_load_onnx_refuses_a_permutation_that_is_not_one(run_dir: Path, tmp_path: Path):
    from lstmlab.checkpoint import load_checkpoint
    from lstmlab.errors import LstmlabError
    from lstmlab.onnxfile import export_onnx, load_onnx

    out = tmp_path / "model.onnx"
    export_onnx(load_checkpoint(run_dir / "best.safetensors"), out)
    graph = onnx.load(str(out))
    entry = graph.metadata_props.add()
    entry.key, entry.value = "lstmlab_permutation", "[0, 0, 1]"  # a rows-view model with a bogus permutation
    onnx.save(graph, str(out))
    with pytest.raises(LstmlabError, match="permutation"):
        load_onnx(out)
    with pytest.raises(LstmlabError, match="does-not-exist.onnx"):
        load_onnx(tmp_path / "does-not-exist.onnx")
