"""``prune`` (MLP channels, and KV groups with smaller cache inputs) exports to ONNX as the same MatMuls on smaller
weights (and, quantized, MatMulNBits) that ONNX Runtime runs like the reference. Tolerance as
test_onnx_factorize.py's: only GEMM summation order differs; 1e-5."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from tests.conftest import llama_inputs  # noqa: E402


@pytest.mark.parametrize("pipeline,quantized", [
    ("prune(mlp=0.5,score=magnitude)", 0),
    # 32 of 64 channels kept: down_proj's in_features 32 fits MatMulNBits' block 16
    ("prune(mlp=0.5,heads=0.5,score=magnitude),quantize(bits=4,group=16,exclude=lm_head)", 14)])
def test_pruned_llama_exports_and_matches_reference(tiny_llama, tmp_path, pipeline, quantized):
    from llmpress.api import run_pipeline
    from llmpress.backends.onnx import OrtProgram, export
    from llmpress.ir.capture import capture

    module, records = run_pipeline(capture(tiny_llama), pipeline, progress=False)
    assert records[0].stats["pruned"] == (4 if "heads" in pipeline else 2)
    assert all(layer["kept"] == (1 if layer.get("kv_groups") else 32) for layer in records[0].stats["layers"].values())
    assert module.op_histogram()["llmpress.wq_linear.default"] == quantized
    path = export(module, tmp_path / "pruned.onnx")
    x = llama_inputs(tiny_llama)
    if "heads" in pipeline:  # the caches have one KV head left
        x = (*x[:2], *(torch.zeros(1, 1, *c.shape[2:]) for c in x[2:]))
    ref = module.run(*x)
    got = OrtProgram(path)(*x)
    for a, b in zip(got, ref):
        torch.testing.assert_close(torch.as_tensor(a), b, rtol=1e-5, atol=1e-5)
