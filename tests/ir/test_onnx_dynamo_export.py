"""ONNX files from another tool: the reference model exported by PyTorch's own exporter
(``torch.onnx.export(..., dynamo=True)``, onnxscript) imports into the IR and scores the Hugging Face folder's
perplexity.

Such exports write the attention mask with CumSum/GatherND and guard softmax with IsNaN/Where; the op-level
semantics are checked by ``test_onnx_conformance``, the whole model here.

Tolerance: "the same perplexity to 4 significant digits" is the check asked for; both sides run the same fp32
formulas in different summation orders, so the two perplexities agree far closer (observed relative difference
~1e-7); the assertion is the 4-digit rounding plus a relative bound of 1e-5.
"""
from __future__ import annotations

import time

import pytest
import torch

from llmpress.eval.perplexity import perplexity, token_stream
from llmpress.ir.loaders.onnx_import import import_onnx
from llmpress.tokenizer import find_tokenizer, load_tokenizer

from ..conftest import TINYSTORIES, VALID

PREFIX_TOKENS = 4096  # 16 windows of 256: the import is exact up to summation order, a longer prefix adds nothing

pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript (the test extra)")


class _Logits(torch.nn.Module):
    """The Hugging Face model as ``input_ids -> logits`` (no cache): what a plain export writes."""

    def __init__(self, hf: torch.nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=input_ids, use_cache=False).logits


@pytest.mark.slow
def test_reference_model_exported_by_torch_onnx_dynamo_scores_the_hf_perplexity(shared, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(TINYSTORIES).eval()
    model = _Logits(hf).eval()
    path = tmp_path / "tinystories.onnx"
    seq = torch.export.Dim("seq", min=2, max=hf.config.max_position_embeddings)
    t0 = time.perf_counter()
    torch.onnx.export(model, (torch.ones(1, 8, dtype=torch.int64),), str(path), dynamo=True,
                      dynamic_shapes=({1: seq},), input_names=["input_ids"], output_names=["logits"])
    export_s = time.perf_counter() - t0

    module = import_onnx(path)
    assert module.info["onnx"]["producer"] == "pytorch"
    ops = {n.op_type for n in __import__("onnx").load(str(path), load_external_data=False).graph.node}
    assert {"CumSum", "GatherND", "IsNaN"} <= ops, ops  # the ops this import needed, still in the file

    stream = token_stream(VALID, load_tokenizer(find_tokenizer(TINYSTORIES)), max_tokens=PREFIX_TOKENS + 1)
    with torch.no_grad():
        want = perplexity(model, None, stream, context=256, progress=False).perplexity
    got = perplexity(module.exported_program.module(), None, stream, context=256, progress=False).perplexity
    print(f"export {export_s:.1f}s; perplexity HF {want:.6f}, imported ONNX {got:.6f}")
    assert f"{got:.4g}" == f"{want:.4g}"
    assert abs(got - want) <= 1e-5 * want
