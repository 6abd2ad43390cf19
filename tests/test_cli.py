"""The command-line contract: compile / run / eval / inspect on the real 260K-parameter llama2.c model."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from llmpress.cli import main

from .conftest import STORIES260K, VALID

MODEL = str(STORIES260K / "stories260K.bin")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "s260k"
    assert main(["compile", MODEL, "--pipeline", "exact", "-o", str(out), "-q"]) == 0
    return out


def test_compile_writes_an_artifact(artifact):
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["pipeline"] == "exact"
    assert manifest["tokenizer"].startswith("tokenizer/")
    assert [p["name"] for p in manifest["passes"]] == ["fold_constants", "fuse_qkv", "dce"]


def test_run_prints_only_the_text(artifact, capsys):
    assert main(["run", str(artifact), "--prompt", "Once upon a time", "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Once upon a time")
    assert out.count("\n") >= 1 and len(out.split()) > 4
    # The model path gives the same text as its compiled artifact (the exact pipeline changes nothing).
    assert main(["run", MODEL, "--prompt", "Once upon a time", "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out == out


def test_eval_json(artifact, capsys):
    assert main(["eval", str(artifact), "--data", str(VALID), "--max-tokens", "600", "--json", "-q",
                 "--decode-tokens", "4"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert {"perplexity", "tokens", "context", "parameter_bytes", "prefill_ms", "decode_tokens_per_s"} <= set(res)
    assert res["tokens"] == 599 and res["context"] == 256
    assert 1.0 < res["perplexity"] < 100.0


def test_inspect_shows_what_the_pipeline_did(artifact, capsys):
    assert main(["inspect", str(artifact), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    paths = [r["path"] for r in info["layers"]]
    assert "model.layers.0.self_attn.qkv_proj" in paths
    assert "model.layers.0.self_attn.q_proj" not in paths
    assert main(["inspect", str(artifact)]) == 0
    table = capsys.readouterr().out
    assert "qkv_proj" in table and "bytes" in table


def test_bad_pipeline_points_at_the_column(capsys, tmp_path):
    assert main(["compile", MODEL, "--pipeline", "fuse_qkv,quantise(bits=4)", "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "column 10" in err and "did you mean 'quantize'" in err and "^" in err
    assert not (tmp_path / "x").exists()


def test_missing_model_is_a_clear_error(capsys, tmp_path):
    assert main(["run", str(tmp_path / "nope.bin")]) == 2
    assert "nope.bin" in capsys.readouterr().err


def test_console_script_is_installed():
    exe = shutil.which("llmpress") or str(__import__("pathlib").Path(sys.executable).parent / "llmpress")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "compile" in out.stdout


def test_int8_kv_cache_shows_in_inspect_and_eval(artifact, tmp_path, capsys):
    """``kv8`` stores the cache as int8 codes + one float32 scale per (token, head): ``4 * head_dim`` bytes become
    ``head_dim + 4`` (stories260K: head_dim 8, so 32 -> 12 bytes per token, head and K/V)."""
    out = tmp_path / "s260k-kv8"
    assert main(["compile", MODEL, "--pipeline", "exact,kv8", "-o", str(out), "-q"]) == 0
    capsys.readouterr()
    sizes = {}
    for folder in (artifact, out):
        assert main(["inspect", str(folder), "--json"]) == 0
        sizes[folder] = json.loads(capsys.readouterr().out)["kv_cache"]
    lm = json.loads((artifact / "manifest.json").read_text())["lm"]
    vectors = 2 * lm["n_layers"] * lm["n_kv_heads"] * lm["cache_len"]
    assert sizes[artifact] == {"bytes": vectors * lm["head_dim"] * 4, "tensors": 2 * lm["n_layers"],
                               "dtypes": ["float32"], "cache_len": lm["cache_len"]}
    assert sizes[out] == {"bytes": vectors * (lm["head_dim"] + 4), "tensors": 4 * lm["n_layers"],
                          "dtypes": ["float32", "int8"], "cache_len": lm["cache_len"]}
    assert main(["inspect", str(out)]) == 0
    assert f"KV cache: {vectors * (lm['head_dim'] + 4):,} bytes" in capsys.readouterr().out
    assert main(["eval", str(out), "--data", str(VALID), "--max-tokens", "300", "--json", "-q",
                 "--decode-tokens", "2"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["kv_cache_bytes"] == sizes[out]["bytes"] and 1.0 < res["perplexity"] < 100.0
