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

import logging
import time

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from llmpress.eval.perplexity import perplexity, token_stream
from llmpress.ir.loaders.onnx_import import import_onnx
from llmpress.tokenizer import find_tokenizer, load_tokenizer

from ..conftest import TINYSTORIES, VALID

log = logging.getLogger(__name__)

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
    hist = module.op_histogram()
    assert hist.get("aten.linear.default") == 8 * 7 + 1, hist  # q k v o gate up down per layer, and lm_head
    ops = {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}
    assert {"CumSum", "GatherND", "IsNaN"} <= ops, ops  # the ops this import needed, still in the file

    stream = token_stream(VALID, load_tokenizer(find_tokenizer(TINYSTORIES)), max_tokens=PREFIX_TOKENS + 1)
    with torch.no_grad():
        want = perplexity(model, None, stream, context=256, progress=False).perplexity
    got = perplexity(module.exported_program.module(), None, stream, context=256, progress=False).perplexity
    log.info("export %.1fs; perplexity HF %.6f, imported ONNX %.6f", export_s, want, got)
    assert f"{got:.4g}" == f"{want:.4g}"
    assert abs(got - want) <= 1e-5 * want


def test_matmul_by_a_weight_initializer_imports_as_linear(tmp_path) -> None:
    """Dynamo exports write a torch Linear as ``MatMul(x, W.T)`` with ``W.T`` folded into an initializer: it imports
    as ``aten.linear`` with the weight stored ``[out, in]`` (what compression passes match); an initializer also
    used elsewhere stays a MatMul operand. Exact: the same products in the same order (tolerance 1e-6)."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 8)).astype(np.float32)  # [in, out]
    w2 = rng.standard_normal((8, 8)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y0"]),
             helper.make_node("Gather", ["w2", "zero"], ["row"], axis=0),  # w2 also feeds Gather: not a pure weight
             helper.make_node("Add", ["y0", "row"], ["y"])]
    graph = helper.make_graph(nodes, "mm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3, 8])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
                               numpy_helper.from_array(np.array(0, dtype=np.int64), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    module = import_onnx(model)
    params = dict(module._ep.named_parameters())
    assert tuple(params["w1"].shape) == (8, 16)  # stored [out, in]
    hist = module.op_histogram()
    assert hist.get("aten.linear.default") == 1 and hist.get("aten.matmul.default") == 1, hist
    x = rng.standard_normal((2, 3, 16)).astype(np.float32)
    want = (x @ w1) @ w2 + w2[0]
    torch.testing.assert_close(module.run(torch.from_numpy(x)), torch.from_numpy(want), rtol=1e-6, atol=1e-6)
