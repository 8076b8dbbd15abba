"""examples/lstm_from_gates.ipynb runs top to bottom (nbclient, a fresh kernel) on the data ``mnist_dir`` holds,
and its checks hold: the hand-built cell equals nn.LSTM, the training finishes, the figures are drawn."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "lstm_from_gates.ipynb"


def test_notebook_runs_top_to_bottom(mnist_dir, real_mnist, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")

    monkeypatch.setenv("LSTMLAB_DATA", str(mnist_dir))  # the kernel inherits the environment
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path":
                                                                                                    str(tmp_path)}})
    client.execute(env=dict(os.environ))  # raises CellExecutionError naming the failing cell

    text = "\n".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                     for out in cell.get("outputs", []) if out.get("output_type") == "stream")
    assert "largest difference to nn.LSTM, outputs:" in text
    assert "test accuracy after 1500 iterations:" in text
    assert "prediction:" in text
    images = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
              if "image/png" in out.get("data", {})]
    assert len(images) == 2  # the gates of a test digit and of the drawing
    if real_mnist:  # the textbook's recipe, a quarter of its length, is well past chance on the real MNIST
        accuracy = float(text.split("test accuracy after 1500 iterations:")[1].split("%")[0])
        assert accuracy > 50
