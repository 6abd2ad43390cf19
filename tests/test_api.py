"""llmpress.compile(): every kind of model in, a callable artifact out, with what each pass did."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import llmpress
from llmpress.errors import ConfigError
from llmpress.eval import empty_cache

from .conftest import CALIB, STORIES260K
from .ir.test_onnx_import import _mlp, _ort, _save


def test_compile_nn_module_with_exact_pipeline_matches_eager(tiny_llama):
    art = llmpress.compile(tiny_llama, pipeline="exact", progress=False)
    names = [p["name"] for p in art.passes]
    assert names == ["fold_constants", "fuse_qkv", "dce"]
    fuse = art.passes[1]
    assert fuse["modified"] and fuse["stats"]["fused"] == 2
    x = (torch.tensor([[1, 5, 9]]), torch.zeros(1, dtype=torch.int64), *tiny_llama.empty_cache())
    # fp32 with the q/k/v matmuls fused into one: same products, possibly another summation order.
    torch.testing.assert_close(art(*x)[0], tiny_llama(*x)[0], rtol=1e-5, atol=1e-5)


def test_compile_ir_module_leaves_it_unchanged_and_compiles_again(tiny_llama):
    # Passes rewrite the graph in place; compile() works on a structural copy, so the caller's module can be
    # compiled again (another pipeline or target) and still runs as captured.
    module = llmpress.capture(tiny_llama, tiny_llama.example_inputs())
    before = module.op_histogram()
    x = (torch.tensor([[1, 5, 9]]), torch.zeros(1, dtype=torch.int64), *tiny_llama.empty_cache())
    first = llmpress.compile(module, pipeline="fuse_qkv,quantize(bits=8,group=0)", progress=False)
    assert module.op_histogram() == before and not module.info.get("properties")
    second = llmpress.compile(module, pipeline="fuse_qkv,quantize(bits=8,group=0)", progress=False)
    assert second.passes[0]["modified"]
    torch.testing.assert_close(second(*x)[0], first(*x)[0], rtol=0, atol=0)
    torch.testing.assert_close(module.run(*x)[0], tiny_llama(*x)[0], rtol=1e-6, atol=1e-6)


def test_compile_generic_module():
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).eval()
    x = torch.randn(3, 8)
    art = llmpress.compile(mlp, (x,), pipeline="dce", progress=False)
    assert art.lm is None
    torch.testing.assert_close(art(x), mlp(x), rtol=0, atol=0)


def test_compile_onnx_file(tmp_path):
    path = _save(_mlp(np.random.default_rng(0)), tmp_path / "mlp.onnx")
    art = llmpress.compile(path, pipeline="dce", progress=False)
    x = np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)
    torch.testing.assert_close(art(torch.from_numpy(x)), torch.from_numpy(_ort(path, {"x": x})[0]),
                               rtol=1e-5, atol=1e-5)


def test_quantize_through_compile_records_stats_and_shrinks():
    art = llmpress.compile(STORIES260K / "stories260K.bin", pipeline="quantize(bits=8,group=0)", progress=False)
    rec = art.passes[0]
    assert rec["name"] == "quantize" and rec["modified"]
    pb = art.manifest["parameter_bytes"]
    assert pb["after"] < pb["before"]
    assert any(row["compression"] for row in art.manifest["layers"])


def test_calibration_pass_without_data_fails_before_work():
    with pytest.raises(ConfigError, match="calibration"):
        llmpress.compile(STORIES260K / "stories260K.bin", pipeline="gptq(bits=4,group=32)", progress=False)


def test_calibration_from_text_file_runs_gptq():
    from llmpress.passes.recipe import CalibrationSpec

    spec = CalibrationSpec(data=str(CALIB), samples=8, seq_len=64)  # small: this checks the plumbing, not quality
    art = llmpress.compile(STORIES260K / "stories260K.bin", pipeline="gptq(bits=8,group=0)",
                           calibration=spec, progress=False)
    assert art.passes[0]["modified"]
    assert art.passes[0]["stats"]["quantized"] == 5 * 7 + 1  # every linear of 5 blocks, and lm_head


def test_unknown_target_is_refused_before_capture(tiny_llama):
    with pytest.raises(ConfigError, match="target"):
        llmpress.compile(tiny_llama, target="tpu", progress=False)


def test_onnx_target_artifact_runs_in_onnxruntime(tmp_path):
    model = STORIES260K / "stories260K.bin"
    PIPE = "quantize(bits=4,group=32,exclude=lm_head|*.down_proj)"  # down_proj's 172 inputs have no such group
    ref = llmpress.compile(model, pipeline=PIPE, progress=False)
    art = llmpress.compile(model, pipeline=PIPE, target="onnx",
                           progress=False)
    out = art.save(tmp_path / "onnx-art")
    loaded = llmpress.load(out)
    assert loaded.manifest["backend"] == "onnx" and "model.onnx" in loaded.manifest["files"]
    x = (torch.tensor([[1, 403, 407]]), torch.zeros(1, dtype=torch.int64), *empty_cache(ref.lm))
    # MatMulNBits and the reference kernel dequantize the same integers; only summation order differs.
    torch.testing.assert_close(loaded(*x)[0], ref(*x)[0], rtol=1e-4, atol=1e-4)
    assert loaded.generate_ids([1], 20) == ref.generate_ids([1], 20)
