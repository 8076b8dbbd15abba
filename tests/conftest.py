"""Shared fixtures: the MNIST files the tests read, and writers of broken IDX files.

``mnist_dir`` is the real MNIST when it is on the machine ($LSTMLAB_DATA, else ``../shared/data/mnist``
beside the repository); otherwise a temp dir of small synthetic IDX files: 6 000 train / 1 000 test images
of learnable class patterns, labels 0..9 (6 000 so the default --val-size 5000 still leaves training data).
Their SHA-256s are not MNIST's, so in that case the fixture sets ``LSTMLAB_VERIFY=0`` for the rest of the
session: loaders then skip checksum checks unless a call passes ``verify=True`` (as the checksum tests do).
``real_mnist`` says which of the two it is.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from synthetic_idx import CORRUPTIONS, corrupt_idx, write_synthetic_mnist

from lstmlab.data import DATASETS, _find_file, _read_bytes

REPO_ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    """torch.compile's on-disk caches in a fresh folder for this run: torch keys a cached graph by its text, not by
    what a custom op's fake kernel says (pytorch#160472), so a cache left by older lstmlab code on the machine
    handed back code compiled for other buffer shapes (a size-check failure in test_vmap_and_compile_of_a_variant)."""
    folder = tempfile.mkdtemp(prefix="lstmlab-inductor-")
    config._lstmlab_inductor_dir = folder  # type: ignore[attr-defined]
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder


def pytest_unconfigure(config: pytest.Config) -> None:
    folder = getattr(config, "_lstmlab_inductor_dir", None)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def _is_real_mnist(directory: Path) -> bool:
    """Whether ``directory`` holds the four MNIST files with their published checksums."""
    info = DATASETS["mnist"]
    for base in info.files:
        path = _find_file(directory, base)
        if path is None:
            return False
        try:
            if hashlib.sha256(_read_bytes(path)).hexdigest() != info.sha256[base]:
                return False
        except Exception:  # a corrupt copy is simply not the real data
            return False
    return True


@pytest.fixture(scope="session")
def _mnist_source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, bool]]:
    candidates = []
    if os.environ.get("LSTMLAB_DATA"):
        candidates.append(Path(os.environ["LSTMLAB_DATA"]))
    candidates.append(REPO_ROOT.parent / "shared" / "data" / "mnist")
    for candidate in candidates:
        if candidate.is_dir() and _is_real_mnist(candidate):
            yield candidate, True
            return
    directory = write_synthetic_mnist(tmp_path_factory.mktemp("synthetic-mnist"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LSTMLAB_VERIFY", "0")  # synthetic files cannot have MNIST's checksums
        yield directory, False


@pytest.fixture(scope="session")
def mnist_dir(_mnist_source: tuple[Path, bool]) -> Path:
    """A directory holding the four MNIST IDX files (real if available, else synthetic)."""
    return _mnist_source[0]


@pytest.fixture(scope="session")
def real_mnist(_mnist_source: tuple[Path, bool]) -> bool:
    """True when ``mnist_dir`` holds the real MNIST (checksums verified), False for the synthetic stand-in."""
    return _mnist_source[1]


@pytest.fixture
def broken_idx(tmp_path: Path) -> Callable[[str, str], Path]:
    """A factory ``broken_idx(kind, name="bad-idx1-ubyte")`` writing a broken IDX file of one of
    ``synthetic_idx.CORRUPTIONS`` (gzipped when the name ends in .gz) and returning its path."""

    def make(kind: str, name: str = "bad-idx1-ubyte") -> Path:
        assert kind in CORRUPTIONS, kind
        return corrupt_idx(tmp_path / name, kind)

    return make


@pytest.fixture(scope="session")
def native_ops():  # noqa: ANN201 - torch.ops namespace
    """The compiled loops, built into the user's cache if needed (once per machine, ~20-60 s)."""
    from lstmlab.nn import _native

    try:
        _native.build()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"cannot build the native loops here: {e}")
    ops = _native.get()
    if ops is None:
        pytest.skip("native loops built but not loadable")
    return ops


@pytest.fixture(params=["python", "native"])
def loops(request: pytest.FixtureRequest):  # noqa: ANN201 - None or the torch.ops namespace
    """Which step loops the fused backend runs: None = Python, else the compiled ops (with ``loops.using``)."""
    if request.param == "python":
        return None
    return request.getfixturevalue("native_ops")
