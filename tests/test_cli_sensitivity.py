"""``llmpress inspect --sensitivity``: mistakes are reported before the model loads; a run prints a row per layer
and writes the PNG (on the real 260K-parameter llama2.c model, one window of 32 tokens)."""
from __future__ import annotations

import json

import pytest

from llmpress.cli import main

from .conftest import CALIB, STORIES260K

MODEL = str(STORIES260K / "stories260K.bin")


@pytest.mark.parametrize("args, message", [
    (["/nonexistent/model", "--sensitivity", "quantize(bits=3,grup=128)", "--calib", "x.txt"], "did you mean 'group'"),
    (["/nonexistent/model", "--sensitivity", "quantize(bits=3,group=128)"], "--calib"),
    ([MODEL, "--sensitivity", "quantize(bits=4,group=0)", "--calib", "/nonexistent.txt"], "does not exist"),
    ([MODEL, "--sensitivity", "quantize(bits=4,group=0)", "--calib", str(CALIB), "--plot", "/nonexistent/s.png"],
     "does not exist"),
    ([MODEL, "--sensitivity", "quantize(bits=4,group=0)", "--calib", str(CALIB), "--plot", "s.jpg"], "PNG"),
])
def test_mistakes_are_reported_before_loading(args, message, capsys, monkeypatch) -> None:
    import llmpress.api

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(llmpress.api, "prepare", no_loading)
    assert main(["inspect", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llmpress: error:") and message in err


def test_prints_each_layer_and_writes_the_png(tmp_path, capsys) -> None:
    png = tmp_path / "sens.png"
    args = ["inspect", MODEL, "--sensitivity", "quantize(bits=4,group=0)", "--calib", str(CALIB), "--samples", "1",
            "--seq-len", "32", "-q"]
    assert main([*args, "--plot", str(png), "--json"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    res = json.loads(capsys.readouterr().out)
    layers = res["layers"]
    assert len(layers) == 35 and all(r["score"] > 0 and r["metric"] == "kl" for r in layers)  # 5 blocks x 7
    assert res["skipped"] == [["lm_head", "its weight is shared with 1 other op(s)"]]  # tied to the embedding
    # The per-channel int4 layers: 4 bits + a float32 scale per row; down_proj's rows are longer (172 inputs).
    assert {round(r["bits_per_weight"], 3) for r in layers} == {4.5, 4.186}
