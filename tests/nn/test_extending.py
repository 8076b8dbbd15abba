"""docs/extending.md's cell variant, applied to a scratch copy of the tree: it is a ``--cell`` choice, its own test
passes (a forward and backward on the reference and fused backends) and the tree stays ruff clean."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _cell_variant_diff() -> str:
    """The diff block of the page's "Add a cell variant" section."""
    text = (REPO / "docs" / "extending.md").read_text()
    section = text[text.index("## Add a cell variant") :]
    return section.split("```diff\n", 1)[1].split("```", 1)[0]


def apply_doc_diff(diff: str, root: Path) -> None:
    """Apply the page's diffs, which only add lines: in each hunk (after an ``@@`` line) the context lines must
    occur once in the file and the ``+`` lines go in among them; a hunk without context is appended."""
    files: dict[str, list[list[str]]] = {}
    hunk: list[str] = []
    for line in diff.splitlines():
        if line.startswith("+++ b/"):
            hunk = []
            files[line[6:]] = [hunk]
        elif line.startswith("@@"):
            hunk = []
            files[next(reversed(files))].append(hunk)
        elif not line.startswith("--- "):
            hunk.append(line)
    for name, hunks in files.items():
        path = root / name
        text = path.read_text()
        for lines in filter(None, hunks):
            old = "".join(line[1:] + "\n" for line in lines if line.startswith(" "))
            new = "".join(line[1:] + "\n" for line in lines if line[:1] in (" ", "+"))
            if not old:
                text = text.rstrip("\n") + "\n\n\n" + new
                continue
            assert text.count(old) == 1, f"{name}: the context of a hunk is not in the file once:\n{old}"
            text = text.replace(old, new)
        path.write_text(text)


def test_the_documented_cell_variant_works_from_its_table_entry(tmp_path: Path) -> None:
    for folder in ("src", "tests"):
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)  # ruff's settings
    apply_doc_diff(_cell_variant_diff(), tmp_path)
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "src"))
    done = subprocess.run([sys.executable, "-m", "lstmlab", "train", "--help"], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "--cell {lstm,peephole,layernorm,gain}" in done.stdout
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/nn/test_variants.py",
                           "-k", "gain_cell or layernorm_lstm_equals"], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=600)
    assert done.returncode == 0 and "2 passed" in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.skip("no ruff here to check the applied diff with")
    lint = subprocess.run([ruff, "check", "--no-cache", "src", "tests"], capture_output=True, text=True, cwd=tmp_path)
    assert lint.returncode == 0, lint.stdout
