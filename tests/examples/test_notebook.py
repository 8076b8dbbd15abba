"""examples/lstm_from_gates.ipynb and its Korean twin, lstm_from_gates.ko.ipynb, each run top to bottom (nbclient, a
fresh kernel) on the data ``mnist_dir`` holds, and their checks hold: the hand-built cell equals nn.LSTM, the training
finishes, the figures are drawn. The twin has the same code (Korean markdown and comments), so the same checks."""

from __future__ import annotations

import io
import os
import tokenize
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
NOTEBOOKS = ["lstm_from_gates.ipynb", "lstm_from_gates.ko.ipynb"]


def _code(nb) -> list[list[tuple[int, str]]]:
    """The tokens of each code cell, without comments (the twin's are in Korean) and blank lines."""
    return [[(t.type, t.string) for t in tokenize.generate_tokens(io.StringIO(cell.source).readline)
             if t.type not in (tokenize.COMMENT, tokenize.NL)]
            for cell in nb.cells if cell.cell_type == "code"]


def test_the_korean_twin_has_the_english_code():
    nbformat = pytest.importorskip("nbformat")
    english, korean = (nbformat.read(EXAMPLES / name, as_version=4) for name in NOTEBOOKS)
    assert _code(korean) == _code(english)
    assert [c.cell_type for c in korean.cells] == [c.cell_type for c in english.cells]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name, mnist_dir, real_mnist, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")

    monkeypatch.setenv("LSTMLAB_DATA", str(mnist_dir))  # the kernel inherits the environment
    nb = nbformat.read(EXAMPLES / name, as_version=4)
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
