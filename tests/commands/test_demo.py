"""``lstmlab demo``: its flags' defaults, the one-line errors before anything is loaded; the app itself is tested in
tests/demo/test_app.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from lstmlab.cli import build_parser, main


def test_demo_binds_localhost_and_never_shares(monkeypatch: pytest.MonkeyPatch) -> None:
    from lstmlab.demo import launch

    args = build_parser().parse_args(["demo", "model.safetensors"])
    assert (args.host, args.port) == ("127.0.0.1", 7860)
    seen = {}

    class FakeApp:
        def launch(self, **kwargs):
            seen.update(kwargs)
            return None, "http://127.0.0.1:7860/", None

    assert launch(FakeApp(), block=False) == "http://127.0.0.1:7860/"
    assert seen["share"] is False and seen["server_name"] == "127.0.0.1" and seen["inbrowser"] is False
    assert seen["max_file_size"] == "5mb"  # uploads are capped


def test_demo_without_gradio_is_a_one_line_hint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(__import__("sys").modules, "gradio", None)  # import gradio now raises ImportError
    assert main(["demo", str(tmp_path / "model.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "lstmlab demo: error: the demo needs gradio: pip install 'lstmlab[demo]'"
    assert main(["demo", str(tmp_path / "model.safetensors"), "--port", "70000"]) == 2
    assert "--port must be in 1..65535" in capsys.readouterr().err
