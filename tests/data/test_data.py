"""The data layer: IDX reading and its errors, checksums, finding and downloading files (offline, from a
local HTTP server), sequence views, splits, pixel statistics and batches."""

from __future__ import annotations

import contextlib
import functools
import gzip
import http.server
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from synthetic_idx import synthetic_split, write_bytes, write_idx, write_synthetic_mnist

from lstmlab.data import (
    DATASETS,
    FILE_NAMES,
    VIEWS,
    batch_indices,
    cache_dir,
    load_dataset,
    make_permutation,
    pixel_stats,
    read_idx,
    resolve_data_dir,
    to_sequence,
    train_val_split,
)
from lstmlab.errors import LstmlabError

FASHION_SYSTEM_DIR = DATASETS["fashion-mnist"].system_dir

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No LSTMLAB_DATA, checksums on, and a private empty cache; returns the XDG cache root."""
    monkeypatch.delenv("LSTMLAB_DATA", raising=False)
    monkeypatch.delenv("LSTMLAB_VERIFY", raising=False)
    root = tmp_path / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(root))
    return root


# ---------------------------------------------------------------------------------------------
# real MNIST (or the synthetic stand-in)


def test_load_shapes_and_dtypes(mnist_dir: Path, real_mnist: bool) -> None:
    for split, n_real in (("train", 60000), ("test", 10000)):
        images, labels = load_dataset("mnist", split, data_dir=mnist_dir)
        assert images.dtype == torch.uint8 and labels.dtype == torch.int64
        assert images.dim() == 3 and images.shape[1:] == (28, 28)
        assert labels.shape == (images.shape[0],)
        assert 0 <= int(labels.min()) and int(labels.max()) <= 9
        assert set(labels.unique().tolist()) == set(range(10))
        if real_mnist:
            assert images.shape[0] == n_real


def test_real_mnist_figures(mnist_dir: Path, real_mnist: bool) -> None:
    if not real_mnist:
        pytest.skip("real MNIST not on this machine")
    train_images, train_labels = load_dataset("mnist", "train", data_dir=mnist_dir, verify=True)
    _, test_labels = load_dataset("mnist", "test", data_dir=mnist_dir, verify=True)
    assert torch.bincount(train_labels, minlength=10).tolist() == MNIST_TRAIN_COUNTS
    assert torch.bincount(test_labels, minlength=10).tolist() == MNIST_TEST_COUNTS
    mean, std = pixel_stats(train_images)
    assert mean == pytest.approx(0.1307, abs=1e-3)
    assert std == pytest.approx(0.3081, abs=1e-3)


def test_raw_and_gz_read_equal(mnist_dir: Path, tmp_path: Path) -> None:
    for base in (FILE_NAMES[("test", "images")], FILE_NAMES[("test", "labels")]):
        src = next(p for p in (mnist_dir / f"{base}.gz", mnist_dir / base) if p.is_file())
        data = gzip.decompress(src.read_bytes()) if src.suffix == ".gz" else src.read_bytes()
        raw = write_bytes(tmp_path / base, data)
        gz = write_bytes(tmp_path / f"{base}.gz", data)
        assert gz.read_bytes()[:2] == b"\x1f\x8b" and raw.read_bytes()[:2] == b"\x00\x00"
        a, b = read_idx(raw), read_idx(gz)
        assert a.dtype == torch.uint8 and a.shape == b.shape and torch.equal(a, b)


def test_raw_directory_loads_like_gz(tmp_path: Path) -> None:
    gz_dir = write_synthetic_mnist(tmp_path / "gz", 50, 20, gz=True)
    raw_dir = write_synthetic_mnist(tmp_path / "raw", 50, 20, gz=False)
    for split in ("train", "test"):
        a = load_dataset("mnist", split, data_dir=gz_dir, verify=False)
        b = load_dataset("mnist", split, data_dir=raw_dir, verify=False)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ---------------------------------------------------------------------------------------------
# IDX errors


def test_read_idx_roundtrip(tmp_path: Path) -> None:
    t = torch.randint(0, 256, (3, 4, 5), dtype=torch.uint8)
    assert torch.equal(read_idx(write_idx(tmp_path / "x-idx3-ubyte", t)), t)
    labels = torch.tensor([3, 1, 4], dtype=torch.uint8)
    assert torch.equal(read_idx(write_idx(tmp_path / "y-idx1-ubyte.gz", labels)), labels)
    empty = torch.zeros((0,), dtype=torch.uint8)
    assert read_idx(write_idx(tmp_path / "e-idx1-ubyte", empty)).shape == (0,)


@pytest.mark.parametrize(
    ("kind", "name", "words"),
    [
        ("bad_magic", "bad-idx1-ubyte", "not an IDX file"),
        ("bad_magic", "bad-idx1-ubyte.gz", "not an IDX file"),
        ("bad_dtype", "bad-idx1-ubyte", "not unsigned bytes"),
        ("bad_ndim", "bad-idx1-ubyte", "2 dimensions"),
        ("truncated", "bad-idx1-ubyte", "truncated"),
        ("truncated", "bad-idx1-ubyte.gz", "truncated"),
        ("trailing", "bad-idx1-ubyte", "trailing bytes"),
        ("corrupt_gzip", "bad-idx1-ubyte.gz", "corrupt gzip"),
        ("truncated_gzip", "bad-idx1-ubyte.gz", "corrupt gzip"),
        ("not_gzip", "bad-idx1-ubyte.gz", "not a gzip file"),
        ("empty", "bad-idx1-ubyte", "too short"),
    ],
)
def test_broken_idx_is_one_line_error(broken_idx, kind: str, name: str, words: str) -> None:
    path = broken_idx(kind, name)
    with pytest.raises(LstmlabError) as e:
        read_idx(path)
    msg = str(e.value)
    assert words in msg
    assert str(path) in msg and "\n" not in msg
    assert "--data-dir" in msg and "re-download" in msg


def test_missing_file_read_is_lstmlab_error(tmp_path: Path) -> None:
    with pytest.raises(LstmlabError, match="cannot read"):
        read_idx(tmp_path / "nope-idx1-ubyte")


def test_corrupt_file_inside_dataset_dir(tmp_path: Path, broken_idx) -> None:
    d = write_synthetic_mnist(tmp_path / "d", 30, 10)
    shutil.copy(broken_idx("truncated", "x.gz"), d / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(LstmlabError, match=r"t10k-labels-idx1-ubyte\.gz is truncated"):
        load_dataset("mnist", "test", data_dir=d, verify=False)
    assert load_dataset("mnist", "train", data_dir=d, verify=False)[0].shape == (30, 28, 28)


def test_checksum_mismatch(tmp_path: Path) -> None:
    d = write_synthetic_mnist(tmp_path / "fake", 40, 10)
    with pytest.raises(LstmlabError) as e:
        load_dataset("mnist", "train", data_dir=d, verify=True)
    msg = str(e.value)
    assert "train-images-idx3-ubyte.gz" in msg and "corrupt or of another dataset" in msg and "\n" not in msg
    images, _ = load_dataset("mnist", "train", data_dir=d, verify=False)
    assert images.shape == (40, 28, 28)


def test_verify_default_follows_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = write_synthetic_mnist(tmp_path / "fake", 20, 10)
    monkeypatch.setenv("LSTMLAB_VERIFY", "1")
    with pytest.raises(LstmlabError, match="corrupt or of another dataset"):
        load_dataset("mnist", "test", data_dir=d)
    monkeypatch.setenv("LSTMLAB_VERIFY", "0")
    assert load_dataset("mnist", "test", data_dir=d)[1].shape == (10,)


def test_other_dataset_is_caught(mnist_dir: Path, real_mnist: bool) -> None:
    if not real_mnist:
        pytest.skip("needs the real MNIST files")
    with pytest.raises(LstmlabError, match="is mnist's file, not fashion-mnist's; pass --data-dir"):
        load_dataset("fashion-mnist", "test", data_dir=mnist_dir, verify=True)


def test_count_and_label_range_checks(tmp_path: Path) -> None:
    d = write_synthetic_mnist(tmp_path / "d", 20, 10)
    images, labels = synthetic_split(10, 3)
    write_idx(d / "t10k-labels-idx1-ubyte.gz", labels[:9])
    with pytest.raises(LstmlabError, match="has 10 images but .* has 9 labels"):
        load_dataset("mnist", "test", data_dir=d, verify=False)
    bad = labels.clone()
    bad[4] = 10
    write_idx(d / "t10k-labels-idx1-ubyte.gz", bad)
    with pytest.raises(LstmlabError, match=r"label 10, outside 0\.\.9"):
        load_dataset("mnist", "test", data_dir=d, verify=False)
    write_idx(d / "t10k-images-idx3-ubyte.gz", images.reshape(10, 56, 14))
    write_idx(d / "t10k-labels-idx1-ubyte.gz", labels)
    with pytest.raises(LstmlabError, match=r"not \(N, 28, 28\) images"):
        load_dataset("mnist", "test", data_dir=d, verify=False)


def test_unknown_names() -> None:
    with pytest.raises(LstmlabError) as e:
        load_dataset("cifar10", "train")
    assert "mnist" in str(e.value) and "fashion-mnist" in str(e.value)
    with pytest.raises(LstmlabError, match="train, test"):
        load_dataset("mnist", "validation")


# ---------------------------------------------------------------------------------------------
# finding the files


def test_explicit_dir_missing_files(tmp_path: Path, no_env: Path) -> None:
    d = write_synthetic_mnist(tmp_path / "part", 20, 10)
    (d / "train-labels-idx1-ubyte.gz").unlink()
    (d / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(LstmlabError) as e:
        resolve_data_dir("mnist", d)
    msg = str(e.value)
    assert "train-labels-idx1-ubyte" in msg and "t10k-images-idx3-ubyte" in msg
    assert "train-images-idx3-ubyte" not in msg
    assert str(d) in msg and "--data-dir" in msg and "\n" not in msg
    assert not (no_env / "lstmlab").exists()  # an explicit dir is never downloaded into
    with pytest.raises(LstmlabError, match="not a directory"):
        resolve_data_dir("mnist", tmp_path / "nowhere")


def test_resolution_order(tmp_path: Path, no_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit = write_synthetic_mnist(tmp_path / "explicit", 20, 10)
    env = write_synthetic_mnist(tmp_path / "env", 20, 10)
    cached = write_synthetic_mnist(cache_dir("mnist"), 20, 10)
    assert cached == no_env / "lstmlab" / "mnist"
    assert resolve_data_dir("mnist", download=False) == cached
    monkeypatch.setenv("LSTMLAB_DATA", str(env))
    assert resolve_data_dir("mnist", download=False) == env
    assert resolve_data_dir("mnist", explicit, download=False) == explicit
    # a parent holding <name>/ works as well
    assert resolve_data_dir("mnist", tmp_path / "xdg-cache" / "lstmlab") == cached
    # a LSTMLAB_DATA folder without the dataset is skipped, not an error (issue 11: it may name another dataset)
    monkeypatch.setenv("LSTMLAB_DATA", str(tmp_path / "empty-env"))
    (tmp_path / "empty-env").mkdir()
    assert resolve_data_dir("mnist", download=False) == cached
    # several folders joined by os.pathsep: the first that holds the dataset
    monkeypatch.setenv("LSTMLAB_DATA", os.pathsep.join([str(tmp_path / "empty-env"), str(env)]))
    assert resolve_data_dir("mnist", download=False) == env


def test_cache_without_download(no_env: Path) -> None:
    with pytest.raises(LstmlabError) as e:
        resolve_data_dir("mnist", download=False)
    assert "downloading is off" in str(e.value) and "--data-dir" in str(e.value)
    assert not (no_env / "lstmlab" / "mnist").exists()


@pytest.mark.skipif(
    not all((FASHION_SYSTEM_DIR / f"{b}.gz").is_file() for b in FILE_NAMES.values()),
    reason="Debian package dataset-fashion-mnist not installed",
)
def test_fashion_mnist_system_package(no_env: Path) -> None:
    assert resolve_data_dir("fashion-mnist", download=False) == FASHION_SYSTEM_DIR
    images, labels = load_dataset("fashion-mnist", "test", download=False)
    assert images.shape == (10000, 28, 28)
    assert torch.bincount(labels, minlength=10).tolist() == [1000] * 10
    assert DATASETS["fashion-mnist"].classes[9] == "Ankle boot"


# ---------------------------------------------------------------------------------------------
# downloading, offline: a local HTTP server


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves files under its directory; paths under /slow/ answer after a pause (for timeouts)."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path.startswith("/slow/"):
            time.sleep(1.0)
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that timed out and hung up is expected here, not worth a traceback


@contextlib.contextmanager
def _serve(root: Path) -> Iterator[str]:
    server = _Server(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _gz_copies(src: Path, dst: Path) -> Path:
    """``dst`` holding a .gz of each of the four files in ``src`` (linked when already gzipped)."""
    dst.mkdir(parents=True)
    for base in FILE_NAMES.values():
        if (src / f"{base}.gz").is_file():
            (dst / f"{base}.gz").symlink_to(src / f"{base}.gz")
        else:
            write_bytes(dst / f"{base}.gz", (src / base).read_bytes())
    return dst


def _no_leftovers(directory: Path) -> None:
    left = [p.name for p in directory.iterdir()] if directory.exists() else []
    assert not [n for n in left if n.endswith(".part") or n.startswith(".")], left


def test_download_falls_back_to_second_mirror(
    mnist_dir: Path, real_mnist: bool, no_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "www"
    _gz_copies(mnist_dir, root / "good")
    (root / "bad").mkdir()
    write_bytes(root / "bad" / "train-labels-idx1-ubyte.gz", b"\x1f\x8b\x08\x00 not really gzip", gz=False)
    if not real_mnist:
        monkeypatch.setenv("LSTMLAB_VERIFY", "0")  # synthetic files lack MNIST's checksums
    with _serve(root) as url:
        mirrors = [f"{url}/missing/", f"{url}/bad/", f"{url}/good/"]
        got = resolve_data_dir("mnist", mirrors=mirrors, timeout=5, quiet=True)
    assert got == no_env / "lstmlab" / "mnist"
    assert sorted(p.name for p in got.iterdir()) == sorted(f"{b}.gz" for b in FILE_NAMES.values())
    _no_leftovers(got)
    for base in FILE_NAMES.values():
        assert (got / f"{base}.gz").read_bytes() == (root / "good" / f"{base}.gz").read_bytes()
    images, labels = load_dataset("mnist", "test", download=False, verify=real_mnist)
    assert images.shape[0] == labels.shape[0] > 0
    if real_mnist:
        assert torch.bincount(labels, minlength=10).tolist() == MNIST_TEST_COUNTS


def test_download_only_missing_files(mnist_dir: Path, no_env: Path, tmp_path: Path) -> None:
    cached = write_synthetic_mnist(cache_dir("mnist"), 20, 10)
    (cached / "t10k-labels-idx1-ubyte.gz").unlink()
    root = tmp_path / "www"
    _gz_copies(mnist_dir, root / "good")
    before = (cached / "train-images-idx3-ubyte.gz").read_bytes()
    with _serve(root) as url:
        resolve_data_dir("mnist", mirrors=[f"{url}/good/"], verify=False, quiet=True)
    assert (cached / "train-images-idx3-ubyte.gz").read_bytes() == before
    assert (cached / "t10k-labels-idx1-ubyte.gz").read_bytes() == (root / "good/t10k-labels-idx1-ubyte.gz").read_bytes()


def test_download_all_mirrors_fail(no_env: Path, tmp_path: Path) -> None:
    root = tmp_path / "www"
    write_synthetic_mnist(root / "wrong", 20, 10)  # valid IDX files, but not MNIST's checksums
    (root / "slow").mkdir()
    with _serve(root) as url:
        mirrors = [f"{url}/missing/", f"{url}/slow/", f"{url}/wrong/"]
        with pytest.raises(LstmlabError) as e:
            resolve_data_dir("mnist", mirrors=mirrors, timeout=0.3, quiet=True)
    msg = str(e.value)
    assert "\n" not in msg
    for base in FILE_NAMES.values():
        assert base in msg
    assert "404" in msg and "timed out" in msg and "checksum mismatch" in msg
    assert "--data-dir DIR" in msg and "LSTMLAB_DATA" in msg
    cached = no_env / "lstmlab" / "mnist"
    assert list(cached.iterdir()) == []  # nothing half-written, nothing unverified kept


def test_download_unreachable_server(no_env: Path) -> None:
    with _serve(no_env.parent) as url:
        pass  # the port is closed again: connection refused
    with pytest.raises(LstmlabError, match="could not download"):
        resolve_data_dir("mnist", mirrors=[url + "/"], timeout=2, quiet=True)
    _no_leftovers(no_env / "lstmlab" / "mnist")


# ---------------------------------------------------------------------------------------------
# sequences


def test_views_shapes_and_values() -> None:
    images = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    perm = make_permutation(5)
    mean, std = 0.13, 0.31
    x = (images.float() / 255 - mean) / std
    for view, (t, i) in VIEWS.items():
        seq = to_sequence(images, view, mean, std, permutation=perm)
        assert seq.shape == (3, t, i) and seq.dtype == torch.float32
    torch.testing.assert_close(to_sequence(images, "rows", mean, std), x)
    pixels = to_sequence(images, "pixels", mean, std)
    torch.testing.assert_close(pixels[:, :, 0], x.reshape(3, 784))
    assert pixels[1, 28 * 2 + 5, 0] == x[1, 2, 5]  # row-major: step 61 is row 2, column 5
    permuted = to_sequence(images, "permuted", mean, std, permutation=perm)
    torch.testing.assert_close(permuted[:, :, 0], x.reshape(3, 784)[:, perm])
    assert not torch.equal(permuted, pixels)
    torch.testing.assert_close(permuted.sort(dim=1).values, pixels.sort(dim=1).values)


def test_batch_of_one() -> None:
    image = torch.full((1, 28, 28), 255, dtype=torch.uint8)
    for view, (t, i) in VIEWS.items():
        seq = to_sequence(image, view, 0.5, 0.5, permutation=make_permutation(0))
        assert seq.shape == (1, t, i)
        assert torch.allclose(seq, torch.ones(1, t, i))


def test_to_sequence_errors() -> None:
    images = torch.zeros((2, 28, 28), dtype=torch.uint8)
    with pytest.raises(ValueError, match="permutation"):
        to_sequence(images, "permuted", 0.1, 0.3)
    with pytest.raises(ValueError, match="shape"):
        to_sequence(images, "permuted", 0.1, 0.3, permutation=torch.arange(100))
    with pytest.raises(ValueError, match="unknown view"):
        to_sequence(images, "columns", 0.1, 0.3)
    with pytest.raises(ValueError, match=r"\(B, 28, 28\)"):
        to_sequence(images[0], "rows", 0.1, 0.3)
    with pytest.raises(TypeError, match="uint8"):
        to_sequence(images.float(), "rows", 0.1, 0.3)


def test_permutation_determinism() -> None:
    a, b, c = make_permutation(1), make_permutation(1), make_permutation(2)
    assert a.dtype == torch.int64 and a.shape == (784,)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a.sort().values, torch.arange(784))
    assert torch.equal(make_permutation(3, length=10).sort().values, torch.arange(10))
    torch.manual_seed(0)
    first = make_permutation(9)
    torch.manual_seed(1)
    assert torch.equal(first, make_permutation(9))  # independent of the global RNG


# ---------------------------------------------------------------------------------------------
# splits, statistics, batches


def test_train_val_split() -> None:
    train, val = train_val_split(1000, 100, seed=3)
    assert train.dtype == val.dtype == torch.int64
    assert len(train) == 900 and len(val) == 100
    assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(1000))
    again = train_val_split(1000, 100, seed=3)
    assert torch.equal(train, again[0]) and torch.equal(val, again[1])
    assert not torch.equal(val, train_val_split(1000, 100, seed=4)[1])
    assert not torch.equal(val, torch.arange(900, 1000))  # shuffled, not the tail
    empty_train, empty_val = train_val_split(10, 0, seed=0)
    assert len(empty_val) == 0 and torch.equal(empty_train, torch.arange(10))
    for bad in (-1, 10, 11):
        with pytest.raises(LstmlabError, match="validation size"):
            train_val_split(10, bad, seed=0)


def test_pixel_stats_exact() -> None:
    images = torch.tensor([[[0, 255], [255, 0]]], dtype=torch.uint8)
    assert pixel_stats(images) == pytest.approx((0.5, 0.5))
    images = torch.randint(0, 256, (7, 28, 28), dtype=torch.uint8)
    x = images.double() / 255
    mean, std = pixel_stats(images)
    assert mean == pytest.approx(float(x.mean()), abs=1e-12)
    assert std == pytest.approx(float(x.std(unbiased=False)), abs=1e-12)
    with pytest.raises(TypeError):
        pixel_stats(images.float())


def test_batch_indices() -> None:
    batches = list(batch_indices(10, 4, shuffle=False))
    assert [b.tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [len(b) for b in batch_indices(10, 4, shuffle=False, drop_last=True)] == [4, 4]
    assert list(batch_indices(3, 4, drop_last=True)) == []
    shuffled = list(batch_indices(10, 3, generator=torch.Generator().manual_seed(0)))
    assert [len(b) for b in shuffled] == [3, 3, 3, 1]
    assert torch.equal(torch.cat(shuffled).sort().values, torch.arange(10))
    again = list(batch_indices(10, 3, generator=torch.Generator().manual_seed(0)))
    assert all(torch.equal(a, b) for a, b in zip(shuffled, again, strict=True))
    assert [b.tolist() for b in batch_indices(1, 1)] == [[0]]
    images = torch.randint(0, 256, (10, 28, 28), dtype=torch.uint8)
    batch = images[next(iter(batch_indices(10, 1, shuffle=False)))]
    assert batch.shape == (1, 28, 28)  # a batch of one keeps its batch dimension
    with pytest.raises(LstmlabError):
        next(batch_indices(10, 0))
