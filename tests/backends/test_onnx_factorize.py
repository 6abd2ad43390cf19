"""``factorize`` exports to ONNX as two MatMuls per layer (and, quantized, two MatMulNBits) that ONNX Runtime runs
like the reference. Tolerance as test_onnx_export.py's: only GEMM summation order differs (measured 3.6e-7 on the
tiny Llama's logits); 1e-5 keeps its margin."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from tests.conftest import llama_inputs  # noqa: E402


@pytest.mark.parametrize("pipeline,quantized", [
    ("factorize(rank=8,exclude=lm_head)", 0),
    # rank 16 fits MatMulNBits' blocks (a power of two from 16); it shrinks only the 64x32 / 32x64 MLP layers
    ("factorize(rank=16,multiple=16,exclude=lm_head),quantize(bits=4,group=16,exclude=lm_head)", 12 + 8)])
def test_factorized_llama_exports_and_matches_reference(tiny_llama, tmp_path, pipeline, quantized):
    from llmpress.api import run_pipeline
    from llmpress.backends.onnx import OrtProgram, export
    from llmpress.ir.capture import capture

    module, _ = run_pipeline(capture(tiny_llama), pipeline, progress=False)
    assert module.op_histogram()["llmpress.wq_linear.default"] == quantized
    path = export(module, tmp_path / "factorized.onnx")
    x = llama_inputs(tiny_llama)
    ref = module.run(*x)
    got = OrtProgram(path)(*x)
    for a, b in zip(got, ref):
        torch.testing.assert_close(torch.as_tensor(a), b, rtol=1e-5, atol=1e-5)
