"""Sparse layers export to ONNX dense-equivalent, and the artifact's manifest says so per layer.

ONNX Runtime's CPU provider runs no sparse matmul, so ``sparsify``'s zeros stay ordinary weight values (MatMul, or
MatMulNBits under a quantizer); ``payload.sparse_layers`` names each such layer with its pattern, its sparsity,
``"stored": "dense-equivalent"`` and why. Outputs match the reference backend (only summation order differs: the
1e-5 of the other ONNX export tests).
"""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from tests.conftest import llama_inputs  # noqa: E402

PIPELINE = ("sparsify(method=magnitude,pattern=2:4,include=*.mlp.*),sparsify(method=magnitude,sparsity=0.5,"
            "include=*.self_attn.*),quantize(bits=4,group=16,include=*.mlp.*)")


def test_sparse_layers_are_dense_equivalent_and_the_manifest_says_so(tiny_llama, tmp_path):
    import llmpress
    from llmpress.backends.onnx.backend import SPARSE_WHY

    art = llmpress.compile(tiny_llama, pipeline=PIPELINE, target="onnx", progress=False)
    folder = art.save(tmp_path / "a")
    layers = json.loads((folder / "manifest.json").read_text())["payload"]["sparse_layers"]
    mlp = {k: v for k, v in layers.items() if ".mlp." in k}
    attn = {k: v for k, v in layers.items() if ".self_attn." in k}
    assert len(mlp) == 2 * 3 and len(attn) == 2 * 4 and len(layers) == 14  # lm_head and embeddings: dense
    assert all(v["pattern"] == "2:4" and v["sparsity"] == pytest.approx(0.5, abs=0.01) for v in mlp.values())
    assert all(v["pattern"] == "unstructured" for v in attn.values())
    assert all(v["stored"] == "dense-equivalent" and v["why"] == SPARSE_WHY for v in layers.values())
    x = llama_inputs(tiny_llama)
    ref = art.module.run(*x)
    got = llmpress.load(folder)(*x)
    torch.testing.assert_close(torch.as_tensor(got[0]), ref[0], rtol=1e-5, atol=1e-5)


def test_dense_models_have_no_sparse_layers_entry(tiny_llama, tmp_path):
    import llmpress

    folder = llmpress.compile(tiny_llama, target="onnx", progress=False).save(tmp_path / "d")
    assert "sparse_layers" not in json.loads((folder / "manifest.json").read_text())["payload"]
