"""Fault suite, inputs and OS errors outside training: hostile checkpoints, gzip bombs, unwritable and unreadable
paths, a damaged native library, predict with good and bad images mixed.

Every case asserts the one-line message on stderr, the exit status (2, or 0 where the tool carries on) and that
the files already there are untouched.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from cli_run import run_cli

from lstmlab.checkpoint import save_checkpoint
from lstmlab.config import Config, DataConfig, ModelConfig
from lstmlab.model import SequenceClassifier

Image = pytest.importorskip("PIL.Image")
ImageDraw = pytest.importorskip("PIL.ImageDraw")

REPO = Path(__file__).resolve().parents[2]


_run = run_cli


def _one_line(code: int, err: str, *needles: str, status: int = 2) -> str:
    assert code == status, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _snapshot(*folders: Path) -> dict[str, bytes]:
    """Every file under the folders, by path, with its bytes: to check that nothing was touched."""
    return {str(p): p.read_bytes() for folder in folders for p in sorted(folder.rglob("*")) if p.is_file()}


def _env(**extra: str) -> dict[str, str]:
    """The environment of a child process that imports this checkout's lstmlab."""
    env = dict(os.environ, **extra)
    given = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([*given, str(REPO / "src")])
    return env


# ---------------------------------------------------------------------------------------------
# checkpoints


def _config(view: str = "rows", hidden: int = 8) -> Config:
    return Config(model=ModelConfig(input_size=28 if view == "rows" else 1, hidden_size=hidden, backend="torch"),
                  data=DataConfig(view=view, mean=0.13, std=0.31))


def _good_checkpoint(path: Path, view: str = "rows") -> Path:
    from lstmlab.data import make_permutation

    torch.manual_seed(0)
    config = _config(view)
    save_checkpoint(path, SequenceClassifier(config.model), config, make_permutation(3) if view == "permuted" else None)
    return path


def _rewrite(src: Path, dst: Path, *, config: Callable[[dict], None] | None = None,
             tensors: Callable[[dict[str, torch.Tensor]], None] | None = None) -> Path:
    """A copy of checkpoint ``src`` at ``dst`` with its config JSON and/or tensors edited in place."""
    from safetensors import safe_open
    from safetensors.torch import save

    with safe_open(str(src), "pt") as f:
        metadata = dict(f.metadata())
        content = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    if config is not None:
        cfg = json.loads(metadata["config"])
        config(cfg)
        metadata["config"] = json.dumps(cfg)  # NaN and Infinity pass as JSON's common extension
    if tensors is not None:
        tensors(content)
    dst.write_bytes(save(content, metadata=metadata))
    return dst


def _set(section: str, key: str, value):  # noqa: ANN202, ANN001
    def edit(cfg: dict) -> None:
        cfg[section][key] = value
    return edit


def _nan_weights(t: dict[str, torch.Tensor]) -> None:
    for k in t:
        if k.startswith("model."):
            t[k] = torch.full_like(t[k], math.nan)


def _duplicate_pixel(t: dict[str, torch.Tensor]) -> None:
    p = t["permutation"].clone()
    p[0] = p[1]
    t["permutation"] = p


def _out_of_range(t: dict[str, torch.Tensor]) -> None:
    p = t["permutation"].clone()
    p[p == 783] = 784
    t["permutation"] = p


def _short_permutation(t: dict[str, torch.Tensor]) -> None:
    t["permutation"] = t["permutation"][:700].clone()


def _bigger_head(t: dict[str, torch.Tensor]) -> None:
    t["model.head.weight"] = torch.zeros(20, 8)
    t["model.head.bias"] = torch.zeros(20)


HOSTILE_CONFIGS = [
    ("hidden-negative", "rows", _set("model", "hidden_size", -5), "model.hidden_size is -5"),
    ("hidden-huge", "rows", _set("model", "hidden_size", 10**9), "model.hidden_size is 1000000000, outside 1..4096"),
    ("hidden-string", "rows", _set("model", "hidden_size", "2"), "model.hidden_size is '2', not a finite int"),
    ("hidden-bool", "rows", _set("model", "hidden_size", True), "model.hidden_size is True"),
    ("layers-huge", "rows", _set("model", "num_layers", 1000), "model.num_layers is 1000, outside 1..16"),
    ("view-evil", "rows", _set("data", "view", "evil"), "data.view is 'evil'"),
    ("dataset-evil", "rows", _set("data", "dataset", "evil"), "data.dataset is 'evil'"),
    ("std-zero", "rows", _set("data", "std", 0.0), "data.std is 0.0, not a positive number"),
    ("std-negative", "rows", _set("data", "std", -1.0), "data.std is -1.0"),
    ("std-nan", "rows", _set("data", "std", math.nan), "data.std is nan, not a finite float"),
    ("mean-null", "rows", _set("data", "mean", None), "data.mean and data.std are missing"),
    ("mean-inf", "rows", _set("data", "mean", math.inf), "data.mean is inf"),
    ("classes-20", "rows", _set("model", "num_classes", 20), "model.num_classes is 20, but mnist has 10 classes"),
    ("input-size", "rows", _set("model", "input_size", 1), "model.input_size is 1, but the rows view gives 28"),
    ("dropout", "rows", _set("model", "dropout", 5.0), "--dropout must be in [0, 1)"),
    ("backend-evil", "rows", _set("model", "backend", "evil"), "--backend must be one of"),
    ("config-list", "rows", lambda cfg: cfg.update(model=[1, 2]), "config is"),
]
HOSTILE_TENSORS = [
    ("nan-weights", "rows", _nan_weights, "holds NaN or infinite values"),
    ("perm-duplicate", "permuted", _duplicate_pixel, "is not a permutation of 0..783"),
    ("perm-out-of-range", "permuted", _out_of_range, "is not a permutation of 0..783"),
    ("perm-short", "permuted", _short_permutation, "permutation has shape [700], the config gives [784]"),
    ("head-20", "rows", _bigger_head, "model.head.weight has shape [20, 8], the config gives [10, 8]"),
]


@pytest.mark.parametrize(("name", "view", "edit", "words"), HOSTILE_CONFIGS, ids=[c[0] for c in HOSTILE_CONFIGS])
def test_hostile_checkpoint_config(tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, view: str,
                                   edit: Callable[[dict], None], words: str) -> None:
    good = _good_checkpoint(tmp_path / "good.safetensors", view)
    bad = _rewrite(good, tmp_path / f"{name}.safetensors", config=edit)
    before = _snapshot(tmp_path)
    code, out, err = _run(capsys, "evaluate", str(bad))
    line = _one_line(code, err, str(bad), words)
    assert out == "" and "use a checkpoint written by `lstmlab train`" in line
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize(("name", "view", "edit", "words"), HOSTILE_TENSORS, ids=[c[0] for c in HOSTILE_TENSORS])
def test_hostile_checkpoint_tensors(tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, view: str,
                                    edit: Callable[[dict], None], words: str) -> None:
    good = _good_checkpoint(tmp_path / "good.safetensors", view)
    bad = _rewrite(good, tmp_path / f"{name}.safetensors", tensors=edit)
    before = _snapshot(tmp_path)
    code, out, err = _run(capsys, "evaluate", str(bad))
    _one_line(code, err, str(bad), words)
    assert out == "" and _snapshot(tmp_path) == before


def test_checkpoint_header_is_read_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Absurd header lengths, a truncated file, and a 6 GB (sparse) file are refused from their first bytes."""
    good = _good_checkpoint(tmp_path / "good.safetensors")
    data = good.read_bytes()
    cases = {
        "absurd.safetensors": ((2**60).to_bytes(8, "little") + data[8:], "its header claims"),
        "short.safetensors": (data[:5], "only 5 bytes"),
        "cut.safetensors": (data[: len(data) - 100], "past the end of the file"),
        "not-json.safetensors": ((20).to_bytes(8, "little") + b"{not json at all...}" + data[28:], "not JSON"),
    }
    for name, (content, _) in cases.items():
        (tmp_path / name).write_bytes(content)
    big = tmp_path / "big.safetensors"
    with open(big, "wb") as f:  # 6 GB that take no disk: a hole after a header that promises 6 GB of tensors
        header = json.dumps({"model.head.weight": {"dtype": "F32", "shape": [1, 1], "data_offsets": [0, 4]}})
        f.write(len(header).to_bytes(8, "little") + header.encode())
        f.truncate(6 << 30)
    cases["big.safetensors"] = (b"", "bytes after the last tensor")
    before = {p.name: p.stat().st_size for p in tmp_path.iterdir()}  # sizes only: the 6 GB file is never read
    for name, (_, words) in cases.items():
        code, _, err = _run(capsys, "predict", str(tmp_path / name), str(tmp_path / "any.png"))
        _one_line(code, err, str(tmp_path / name), words)
    assert {p.name: p.stat().st_size for p in tmp_path.iterdir()} == before
    assert good.read_bytes() == data


def test_mangled_checkpoints_never_escape_as_other_errors(tmp_path: Path) -> None:
    """Random damage to a checkpoint (bytes changed anywhere, mostly in the header and config, or the file cut
    short) either still loads or is an LstmlabError: never another exception."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    from lstmlab.checkpoint import load_checkpoint
    from lstmlab.errors import LstmlabError

    data = _good_checkpoint(tmp_path / "good.safetensors", "permuted").read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    target = tmp_path / "mangled.safetensors"

    @hypothesis.settings(max_examples=150, deadline=None, database=None, derandomize=True)
    @hypothesis.given(edits=st.lists(st.tuples(st.integers(0, header_end + 64), st.integers(0, 255)), min_size=1,
                                     max_size=4),
                      cut=st.one_of(st.none(), st.integers(0, len(data))))
    def check(edits: list[tuple[int, int]], cut: int | None) -> None:
        mangled = bytearray(data)
        for where, value in edits:
            mangled[min(where, len(mangled) - 1)] = value
        target.write_bytes(bytes(mangled[:cut] if cut is not None else mangled))
        try:
            ckpt = load_checkpoint(target)
        except LstmlabError as e:
            assert "\n" not in str(e)
        else:
            assert all(bool(torch.isfinite(t).all()) for t in ckpt.model.state_dict().values())

    check()


def test_any_config_value_is_loaded_or_refused_in_one_line(tmp_path: Path) -> None:
    """Any JSON value in any config field: the checkpoint loads or gives an LstmlabError, never another error."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    from lstmlab.checkpoint import load_checkpoint
    from lstmlab.errors import LstmlabError

    good = _good_checkpoint(tmp_path / "good.safetensors")
    fields = [(section, key) for section, part in _config().to_dict().items() if isinstance(part, dict)
              for key in part]
    values = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=6),
                       st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(),
                                                                            max_size=1))

    @hypothesis.settings(max_examples=200, deadline=None, database=None, derandomize=True)
    @hypothesis.given(field=st.sampled_from(fields), value=values)
    def check(field: tuple[str, str], value) -> None:  # noqa: ANN001
        bad = _rewrite(good, tmp_path / "edited.safetensors", config=_set(*field, value))
        try:
            load_checkpoint(bad)
        except LstmlabError as e:
            assert "\n" not in str(e)

    check()


def test_good_checkpoints_still_load(tmp_path: Path) -> None:
    from lstmlab.checkpoint import load_checkpoint

    for view in ("rows", "pixels", "permuted"):
        ckpt = load_checkpoint(_good_checkpoint(tmp_path / f"{view}.safetensors", view))
        assert ckpt.config.data.view == view
        assert (ckpt.permutation is not None) == (view == "permuted")


def test_demo_refuses_a_hostile_checkpoint_before_serving(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("gradio")
    import lstmlab.demo.app

    def never(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the demo started serving an invalid checkpoint")

    monkeypatch.setattr(lstmlab.demo.app, "build_app", never)
    monkeypatch.setattr(lstmlab.demo.app, "launch", never)
    bad = _rewrite(_good_checkpoint(tmp_path / "good.safetensors"), tmp_path / "bad.safetensors",
                   config=_set("data", "view", "evil"))
    code, out, err = _run(capsys, "demo", str(bad), "--port", "7861")
    _one_line(code, err, "data.view is 'evil'")
    assert out == ""


def test_hostile_checkpoint_in_a_fresh_process_has_no_traceback(tmp_path: Path) -> None:
    bad = _rewrite(_good_checkpoint(tmp_path / "good.safetensors"), tmp_path / "bad.safetensors",
                   config=_set("model", "hidden_size", 10**9))
    proc = subprocess.run([sys.executable, "-m", "lstmlab", "evaluate", str(bad)], capture_output=True, text=True,
                          timeout=300, env=_env(LSTMLAB_NATIVE="0"))
    _one_line(proc.returncode, proc.stderr, "outside 1..4096")


# ---------------------------------------------------------------------------------------------
# data: a gzip bomb


def _bomb(path: Path, inflated_mb: int, images: int = 60_000) -> Path:
    """A gzip file of an IDX header for ``images`` 28x28 images followed by ``inflated_mb`` MB of zeros, written
    streaming: a few hundred KB on disk."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(1 << 20)
    with open(path, "wb") as f:
        f.write(deflate.compress(bytes([0, 0, 8, 3]) + images.to_bytes(4, "big") + (28).to_bytes(4, "big") * 2))
        for _ in range(inflated_mb):
            f.write(deflate.compress(zeros))
        f.write(deflate.flush())
    return path


def test_gzip_bomb_is_refused_without_inflating_it(tmp_path: Path) -> None:
    import tracemalloc

    from lstmlab.data import read_idx
    from lstmlab.errors import LstmlabError

    bomb = _bomb(tmp_path / "train-images-idx3-ubyte.gz", 200)
    size = bomb.stat().st_size
    assert size < 2_000_000
    tracemalloc.start()
    try:
        with pytest.raises(LstmlabError) as e:
            read_idx(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(e.value)
    assert "\n" not in message and str(bomb) in message
    assert "inflates past the 47,040,016 bytes its IDX header announces" in message and "gzip bomb" in message
    assert peak < 150 << 20, peak  # it stopped near the 47 MB the header allows; the bomb holds 200 MB
    assert bomb.stat().st_size == size

    huge = _bomb(tmp_path / "huge-idx3-ubyte.gz", 1, images=2_000_000_000)  # a header announcing 1.5 TB
    with pytest.raises(LstmlabError, match="IDX header announces 1,568,000,000,016 bytes, more than"):
        read_idx(huge)


def test_gzip_bomb_in_a_data_folder_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from synthetic_idx import write_synthetic_mnist

    data = write_synthetic_mnist(tmp_path / "data", 50, 20)
    _bomb(data / "t10k-images-idx3-ubyte.gz", 120, images=10_000)
    ckpt = _good_checkpoint(tmp_path / "model.safetensors")
    for verify in ("1", "0"):  # checksummed: capped at MNIST's known size; unverified: at the header's
        monkeypatch.setenv("LSTMLAB_VERIFY", verify)
        before = _snapshot(tmp_path)
        code, out, err = _run(capsys, "evaluate", str(ckpt), "--data-dir", str(data))
        _one_line(code, err, "t10k-images-idx3-ubyte.gz inflates past the 7,840,016 bytes", "--data-dir")
        assert out == "" and _snapshot(tmp_path) == before


def test_truncated_and_concatenated_gzip(tmp_path: Path) -> None:
    """The streaming reader still takes what gzip.decompress takes (several members, zero padding) and refuses a
    stream that ends early."""
    import gzip

    from lstmlab.data import read_idx
    from lstmlab.errors import LstmlabError

    labels = bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + bytes(range(10))
    two = tmp_path / "two-idx1-ubyte.gz"
    two.write_bytes(gzip.compress(labels[:7]) + gzip.compress(labels[7:]) + bytes(16))
    assert read_idx(two).tolist() == list(range(10))
    cut = tmp_path / "cut-idx1-ubyte.gz"
    cut.write_bytes(gzip.compress(labels)[:-6])
    with pytest.raises(LstmlabError, match="corrupt gzip file"):
        read_idx(cut)


def test_mangled_gzip_idx_files_never_escape_as_other_errors(tmp_path: Path) -> None:
    """Random bytes changed in a gzipped IDX file, or the file cut short: the right tensor or an LstmlabError."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    import gzip

    from lstmlab.data import read_idx
    from lstmlab.errors import LstmlabError

    images = torch.randint(0, 256, (20, 28, 28), dtype=torch.uint8)
    raw = bytes([0, 0, 8, 3]) + (20).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + images.numpy().tobytes()
    data = gzip.compress(raw, mtime=0)
    target = tmp_path / "mangled-idx3-ubyte.gz"

    @hypothesis.settings(max_examples=150, deadline=None, database=None, derandomize=True)
    @hypothesis.given(edits=st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)), max_size=3),
                      cut=st.one_of(st.none(), st.integers(0, len(data))))
    def check(edits: list[tuple[int, int]], cut: int | None) -> None:
        mangled = bytearray(data)
        for where, value in edits:
            mangled[where] = value
        target.write_bytes(bytes(mangled[:cut] if cut is not None else mangled))
        try:
            got = read_idx(target)
        except LstmlabError as e:
            assert "\n" not in str(e)
        else:
            assert got.dtype == torch.uint8 and got.numel() <= len(raw)

    check()


# ---------------------------------------------------------------------------------------------
# unwritable and unreadable paths


@pytest.fixture
def drawn(tmp_path: Path) -> Path:
    img = Image.new("L", (120, 120), 255)
    ImageDraw.Draw(img).line([(20, 20), (100, 20), (50, 110)], fill=0, width=10)
    path = tmp_path / "seven.png"
    img.save(path)
    return path


@contextlib.contextmanager
def _tmpfs(where: Path, options: str) -> Iterator[Path]:
    """A small tmpfs mounted at ``where`` (root only); skips the test where mounting is not allowed."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_gates_out_checked_before_work(tmp_path: Path, drawn: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = _good_checkpoint(tmp_path / "model.safetensors")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    before = _snapshot(tmp_path)
    missing = str(tmp_path / "missing.safetensors")  # the bad --out is found before the checkpoint is read
    for out, words in [(a_file / "g.png", f"{a_file} is a file, not a folder"),
                       (tmp_path, "is a folder; give a file name"),
                       (tmp_path / "g.bmp", "cannot write figures as .bmp; name it .png, .jpg, .pdf or .svg"),
                       (tmp_path / "gates", "a file without a suffix")]:
        code, out_text, err = _run(capsys, "gates", missing, "--image", str(drawn), "--out", str(out))
        _one_line(code, err, words)
        assert out_text == ""
    assert _snapshot(tmp_path) == before
    assert ckpt.is_file()


def test_gates_writes_real_jpeg(tmp_path: Path, drawn: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    ckpt = _good_checkpoint(tmp_path / "model.safetensors")
    for name, magic in [("g.jpg", b"\xff\xd8\xff"), ("g.jpeg", b"\xff\xd8\xff"), ("g.png", b"\x89PNG")]:
        code, out, _ = _run(capsys, "gates", str(ckpt), "--image", str(drawn), "--out", str(tmp_path / name))
        assert code == 0 and out.strip() == f"wrote {tmp_path / name}"
        assert (tmp_path / name).read_bytes()[:len(magic)] == magic
    with Image.open(tmp_path / "g.jpg") as img:
        assert img.format == "JPEG"


def test_gates_out_read_only_and_full_disk(tmp_path: Path, drawn: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    ckpt = _good_checkpoint(tmp_path / "model.safetensors")
    with _tmpfs(tmp_path / "ro", "size=1m,ro") as ro:
        code, _, err = _run(capsys, "gates", str(ckpt), "--image", str(drawn), "--out", str(ro / "g.png"))
        _one_line(code, err, str(ro / "g.png"), "read-only")
    with _tmpfs(tmp_path / "full", "size=64k") as full:
        old = full / "g.png"
        old.write_bytes(b"an earlier figure")
        with contextlib.suppress(OSError):  # fill the disk; a last partial write ends with ENOSPC
            with open(full / "filler", "wb") as f:
                while True:
                    f.write(bytes(4096))
                    f.flush()
        code, _, err = _run(capsys, "gates", str(ckpt), "--image", str(drawn), "--out", str(old))
        _one_line(code, err, f"cannot write {old}", "the disk is full")
        assert old.read_bytes() == b"an earlier figure"
        assert sorted(p.name for p in full.iterdir()) == ["filler", "g.png"]  # no temp file left behind


def test_plot_and_bench_outputs_checked_before_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    run_dir = tmp_path / "run"
    run_dir.mkdir()  # a run with no files but summary.json: had the output not been checked first, the missing
    (run_dir / "summary.json").write_text("{}")  # metrics.csv would be the error
    before = _snapshot(tmp_path)
    code, _, err = _run(capsys, "plot", str(run_dir), "--out-dir", str(a_file / "figs"))
    _one_line(code, err, f"--out-dir {a_file / 'figs'}: {a_file} is a file, not a folder")
    # bench would time for a minute before writing; the path is checked first
    code, out, err = _run(capsys, "bench", "--json", str(a_file / "b.json"), "--batch-sizes", "1")
    _one_line(code, err, f"--json {a_file / 'b.json'}: {a_file} is a file, not a folder")
    assert out == ""
    code, out, err = _run(capsys, "bench", "--json", str(tmp_path), "--batch-sizes", "1")
    _one_line(code, err, f"--json {tmp_path} is a folder")
    assert _snapshot(tmp_path) == before


def test_bench_json_on_read_only_disk(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with _tmpfs(tmp_path / "ro", "size=1m,ro") as ro:
        code, out, err = _run(capsys, "bench", "--json", str(ro / "b.json"), "--batch-sizes", "1")
        _one_line(code, err, f"--json {ro / 'b.json'}: cannot write in {ro}", "read-only")
        assert out == ""


def test_save_figure_os_errors_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the OS says while writing (here: permission denied, as non-root users get it), one line."""
    pytest.importorskip("matplotlib")
    import lstmlab.analysis.figures as plots
    from lstmlab.errors import LstmlabError

    def refuse(path, data):  # noqa: ANN001, ANN202
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(plots, "atomic_write_bytes", refuse)
    fig = plots.new_figure(2, 2)
    with pytest.raises(LstmlabError) as e:
        plots.save_figure(fig, tmp_path / "x.png")
    assert str(e.value) == f"cannot write {tmp_path / 'x.png'}: permission denied; fix its permissions or choose " \
                           "another path"


def test_unreadable_data_folder(tmp_path: Path) -> None:
    """As an unprivileged user (root reads everything, so root runs the check as nobody)."""
    from synthetic_idx import write_synthetic_mnist

    base = Path(tempfile.mkdtemp(prefix="lstmlab-unreadable-"))  # pytest's tmp_path is private to root
    try:
        base.chmod(0o755)
        data = write_synthetic_mnist(base / "data", 50, 20)
        ckpt = _good_checkpoint(base / "model.safetensors")
        ckpt.chmod(0o644)
        data.chmod(0o000)
        env = _env(LSTMLAB_NATIVE="0", LSTMLAB_VERIFY="0", HOME=str(base))
        prefix: list[str] = []
        if os.geteuid() == 0:
            if not shutil.which("setpriv"):
                pytest.skip("running as root without setpriv to drop privileges")
            prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
            probe = subprocess.run([*prefix, sys.executable, "-c", "import torch, lstmlab.cli"], capture_output=True,
                                   timeout=300, env=env)
            if probe.returncode != 0:
                pytest.skip("the unprivileged user cannot run this Python and lstmlab")
        cmd = [*prefix, sys.executable, "-m", "lstmlab", "evaluate", str(ckpt), "--data-dir", str(data)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        _one_line(proc.returncode, proc.stderr, f"cannot read --data-dir {data}: Permission denied",
                  "fix its permissions")
    finally:
        (base / "data").chmod(0o755)
        shutil.rmtree(base, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# predict with good and bad images


def test_predict_answers_every_readable_image(tmp_path: Path, drawn: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = _good_checkpoint(tmp_path / "model.safetensors")
    other = tmp_path / "other.png"
    Image.open(drawn).rotate(90).save(other)
    blank = tmp_path / "blank.png"
    Image.new("L", (40, 40), 255).save(blank)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    missing = tmp_path / "missing.png"
    images = [drawn, blank, other, empty, missing, text]
    before = _snapshot(tmp_path)

    code, out, err = _run(capsys, "predict", str(ckpt), *map(str, images))
    assert code == 2
    answers = out.strip().splitlines()
    assert [a.split(":")[0] for a in answers] == [str(drawn), str(other)]
    errors = err.strip().splitlines()
    assert len(errors) == 4 and all(e.startswith("lstmlab predict: error: ") for e in errors)
    for line, path, words in zip(errors, [blank, empty, missing, text],
                                 ["the image is blank", "is an empty file", "does not exist", "not an image"],
                                 strict=True):
        assert str(path) in line and words in line, line
    assert "Traceback" not in err

    code, out, err = _run(capsys, "predict", str(ckpt), *map(str, images), "--json")
    assert code == 2 and len(err.strip().splitlines()) == 4
    records = json.loads(out)
    assert [r["image"] for r in records] == [str(p) for p in images]
    assert [("error" in r) for r in records] == [False, True, False, True, True, True]
    assert all(0 <= r["prediction"] <= 9 for r in records if "error" not in r)

    code, out, err = _run(capsys, "predict", str(ckpt), str(drawn), str(other))
    assert code == 0 and err == "" and len(out.strip().splitlines()) == 2
    assert _snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------
# the native build cache


def _fake_library(path: Path) -> None:
    """A truncated shared object: the first half of a real one when the machine has one, else an ELF header."""
    real = [p for p in (Path.home() / ".cache" / "lstmlab" / "native").glob("*/lstmlab_native.so")]
    data = real[0].read_bytes() if real else b"\x7fELF\x02\x01\x01" + bytes(57) + bytes(4000)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 2])


def test_damaged_native_library_is_one_warning_not_a_crash(tmp_path: Path) -> None:
    """Run in a child process: loading a truncated library would kill it with SIGBUS."""
    cache = tmp_path / "cache"
    env = _env(LSTMLAB_CACHE_DIR=str(cache), LSTMLAB_NATIVE="auto")
    where = subprocess.run([sys.executable, "-c", "from lstmlab.nn import _native; print(_native.library_path())"],
                           capture_output=True, text=True, env=env, timeout=300, check=True)
    library = Path(where.stdout.strip())
    assert library.is_relative_to(cache)
    for record in (None, {"size": 1, "sha256": "0" * 64}):  # no record (and not a whole ELF file), a wrong one
        _fake_library(library)
        record_path = library.with_name(library.name + ".sha256")
        record_path.unlink(missing_ok=True)
        if record is not None:
            record_path.write_text(json.dumps(record))
        # a recent failed build: no new build is started, so the test stays light (and the warning says so)
        (library.parent / "FAILED.log").write_text("test\n")
        beside = library.parent / "build.log"
        beside.write_text("an earlier log")
        proc = subprocess.run(
            [sys.executable, "-c", "from lstmlab.nn import _native; print(_native.get(), _native.get())"],
            capture_output=True, text=True, env=env, timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "None None"
        line = _one_line(proc.returncode, proc.stderr, str(library), "are damaged", "rebuilding them", status=0)
        assert line.startswith("lstmlab: warning: ")
        assert not library.exists() and not record_path.exists()  # set aside, never loaded
        assert beside.read_text() == "an earlier log"


def test_native_library_record_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lstmlab.nn import _native

    monkeypatch.setenv("LSTMLAB_CACHE_DIR", str(tmp_path))
    built = tmp_path / "built.so"
    built.write_bytes(b"\x7fELF" + os.urandom(3000))
    final = _native.library_path()
    final.parent.mkdir(parents=True)
    _native._install(built, final)
    assert _native.verify(final) is None
    assert sorted(p.name for p in final.parent.iterdir()) == ["lstmlab_native.so", "lstmlab_native.so.sha256"]
    with open(final, "r+b") as f:
        f.seek(100)
        f.write(b"X")
    assert _native.verify(final) == "its SHA-256 differs from its record"
    _native._install(built, final)
    with open(final, "r+b") as f:
        f.truncate(1000)
    assert _native.verify(final) == "it has 1000 bytes, its record says 3004"


def test_dead_builders_lock_is_cleared_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lstmlab.nn import _native

    monkeypatch.setenv("LSTMLAB_CACHE_DIR", str(tmp_path))
    started = []

    class FakeBuild:
        pid = os.getpid()

        def __init__(self, cmd, **kwargs):  # noqa: ANN001, ANN003
            started.append(cmd)

        def poll(self) -> int | None:
            return None

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    monkeypatch.setattr(_native.subprocess, "Popen", FakeBuild)
    monkeypatch.setattr(_native, "compiler_problem", lambda: None)  # its `c++ --version` would meet FakeBuild
    path = _native.library_path()
    path.parent.mkdir(parents=True)
    lock = path.parent / "building.lock"

    lock.write_text(f"{dead.pid} 12345\n")  # a builder that died a moment ago: no 900 s wait
    _native._Loader()._start_background_build(path)
    assert len(started) == 1
    assert lock.read_text().split()[0] == str(os.getpid())  # the new builder's pid

    started.clear()
    _native._Loader()._start_background_build(path)  # a live builder's lock is respected
    assert started == []
    lock.write_text("")  # a lock being written (no pid yet) is young: respected too
    _native._Loader()._start_background_build(path)
    assert started == []


# ---------------------------------------------------------------------------------------------
# the demo's upload caps, served for real


def test_demo_refuses_huge_uploads_and_keeps_serving(tmp_path: Path) -> None:
    """A 39-megapixel PNG of 50 KB and a 6 MB file are refused before decoding; the next drawing is answered."""
    client_mod = pytest.importorskip("gradio_client")
    if not Path("/proc/self/status").is_file():
        pytest.skip("reads the server's peak memory from /proc")
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ckpt = _good_checkpoint(tmp_path / "model.safetensors")
    huge = tmp_path / "huge.png"
    Image.new("L", (7200, 5400), 255).save(huge, optimize=True)  # 39 MP in a small file
    heavy = tmp_path / "heavy.png"
    Image.frombytes("L", (2600, 2600), os.urandom(2600 * 2600)).save(heavy)  # noise: ~6.8 MB
    assert huge.stat().st_size < 1_000_000 and heavy.stat().st_size > 5_000_000
    seven = tmp_path / "seven.png"
    img = Image.new("RGBA", (400, 400), (0, 0, 0, 0))
    ImageDraw.Draw(img).line([(100, 80), (300, 80), (170, 340)], fill="black", width=22)
    img.save(seven)
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [sys.executable, "-m", "lstmlab", "demo", str(ckpt), "--port", str(port)], stdout=log,
        stderr=subprocess.STDOUT, env=_env(GRADIO_TEMP_DIR=str(tmp_path / "gradio"), LSTMLAB_NATIVE="0",
                                           GRADIO_ANALYTICS_ENABLED="False"),
    )
    try:
        client = None
        for _ in range(240):
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            try:
                client = client_mod.Client(f"http://127.0.0.1:{port}/", verbose=False,
                                           download_files=str(tmp_path / "downloads"))
                break
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.5)
        assert client is not None, "the demo did not come up"

        def send(path: Path):  # noqa: ANN202
            value = {"background": None, "layers": [], "composite": client_mod.handle_file(str(path)), "id": None}
            return client.predict(value, api_name="/predict")

        for refused, words in [(huge, "exceeds limit of 4000000 pixels"), (heavy, "exceeds the maximum file size")]:
            with pytest.raises(Exception) as e:  # noqa: B017, PT011 - gradio_client's own error types
                send(refused)
            assert words in str(e.value), e.value
        assert send(seven)[4].startswith("**Prediction:")
        with open(f"/proc/{server.pid}/status") as f:
            peak_kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        assert peak_kib < 1_000_000  # the 39 MP image (1.2 GB as float) was never decoded
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
