"""Decoders exported with ``past_key_values`` inputs and ``present.*`` outputs (optimum's convention), here written
by ``torch.onnx.export(dynamo=True)`` from a transformers Llama with a ``DynamicCache``, import with their KV cache
into llmpress's static-cache calling convention (``PastKVDecoder``, ``LMInfo``).

The oracle is llmpress's own capture of the same Hugging Face folder (transformers' model through its
``StaticCache``, ``llmpress.ir.capture_hf``: the same calling convention and cache layout): prefill, decode steps and a chunk at an offset give the same logits and the same
caches. Tolerance: the same fp32 formulas summed in different orders over two layers: ``rtol = atol = 1e-5``
(observed ~1e-6). The real reference model exported the same way (about 100 s to export on 2 cores, too slow for
the suite) was measured by hand: 25.737597 against the HF folder's 25.737599 on a 4K-token valid prefix, logits
within 1e-5 of the HF folder's at prefill and decode, and the same greedy text.
"""
from __future__ import annotations

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from llmpress.errors import LoadError
from llmpress.ir.loaders import load_model
from llmpress.ir.loaders.onnx_import import PastKVDecoder, import_onnx

pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript (the test extra)")

TOL = dict(rtol=1e-5, atol=1e-5)


class _WithPast(torch.nn.Module):
    """``(input_ids, attention_mask, position_ids, *past) -> (logits, *present)`` around a transformers decoder."""

    def __init__(self, hf: torch.nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.hf.config)
        for i in range(len(past) // 2):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.hf(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      past_key_values=cache, use_cache=True)
        return (out.logits, *[t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)])


def _export_with_past(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1,
                      eos_token_id=2)
    hf = LlamaForCausalLM(cfg).eval()
    folder = tmp_path / "hf"
    hf.save_pretrained(folder)  # config.json beside the .onnx, as optimum writes it
    n, t, p = cfg.num_hidden_layers, 5, 3
    past = [torch.randn(1, 2, p, 16) for _ in range(2 * n)]
    inputs = (torch.ones(1, t, dtype=torch.int64), torch.ones(1, p + t, dtype=torch.int64),
              torch.arange(p, p + t)[None], *past)
    dyn = torch.export.Dim.DYNAMIC
    names = ["input_ids", "attention_mask", "position_ids"] + [f"past_key_values.{i}.{kv}" for i in range(n)
                                                                for kv in ("key", "value")]
    outs = ["logits"] + [f"present.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
    torch.onnx.export(_WithPast(hf).eval(), inputs, str(folder / "model.onnx"), dynamo=True,
                      dynamic_shapes=({1: dyn}, {1: dyn}, {1: dyn}, tuple({2: dyn} for _ in past)),
                      input_names=names, output_names=outs)
    return folder


def test_decoder_exported_with_past_key_values_imports_with_its_kv_cache(tmp_path) -> None:
    folder = _export_with_past(tmp_path)
    loaded = load_model(folder / "model.onnx", cache_len=32)
    assert isinstance(loaded.model, PastKVDecoder)
    module = import_onnx(folder / "model.onnx", cache_len=32)
    lm = module.lm
    assert (lm.n_layers, lm.n_kv_heads, lm.head_dim, lm.cache_len, lm.vocab_size) == (2, 2, 16, 32, 128)
    assert (lm.bos_id, lm.eos_id) == (1, 2)  # from the config.json beside the file
    assert load_model(folder / "model.onnx").model.cache_len == 64  # default: max_position_embeddings

    from llmpress.eval.generate import empty_cache
    from llmpress.ir.capture_hf import HFStaticCacheLM

    ref = HFStaticCacheLM(load_model(folder).model, cache_len=32)  # llmpress's capture of the same HF folder
    fwd = module.exported_program.module()
    g = torch.Generator().manual_seed(1)
    caches_ref, caches_onnx = empty_cache(lm), empty_cache(lm)
    with torch.no_grad():
        for start, t in ((0, 7), (7, 1), (8, 4), (12, 1)):  # prefill, decode, a chunk at an offset, decode
            ids = torch.randint(0, 128, (1, t), generator=g)
            want = ref(ids, torch.tensor([start]), *caches_ref)
            got = fwd(ids, torch.tensor([start]), *caches_onnx)
            assert len(got) == len(want) == 5
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, **TOL)
            caches_ref, caches_onnx = list(want[1:]), list(got[1:])


def _graph(inputs: list[str]) -> onnx.ModelProto:
    """A one-layer identity "decoder" with the given inputs: enough for the layout checks."""
    vi = {"input_ids": helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "t"]),
          "attention_mask": helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [1, "a"]),
          "position_ids": helper.make_tensor_value_info("position_ids", TensorProto.INT64, [1, "t"])}
    past = [helper.make_tensor_value_info(f"past_key_values.0.{kv}", TensorProto.FLOAT, [1, 2, "p", 4])
            for kv in ("key", "value")]
    nodes = [helper.make_node("Identity", [f"past_key_values.0.{kv}"], [f"present.0.{kv}"]) for kv in ("key", "value")]
    nodes.append(helper.make_node("Cast", ["input_ids"], ["logits"], to=TensorProto.FLOAT))
    outs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "t"])] + [
        helper.make_tensor_value_info(f"present.0.{kv}", TensorProto.FLOAT, [1, 2, "p", 4]) for kv in ("key", "value")]
    graph = helper.make_graph(nodes, "dec", [vi[n] for n in inputs] + past, outs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("inputs, message", [
    (["input_ids", "attention_mask"], "needs input_ids, attention_mask, position_ids .* no position_ids"),
    (["input_ids", "position_ids"], "no attention_mask"),
])
def test_decoder_without_mask_or_positions_is_refused(tmp_path, inputs, message) -> None:
    path = tmp_path / "dec.onnx"
    onnx.save(_graph(inputs), str(path))
    with pytest.raises(LoadError, match=message):
        load_model(path)


def test_decoder_with_a_missing_cache_output_is_refused(tmp_path) -> None:
    model = _graph(["input_ids", "attention_mask", "position_ids"])
    del model.graph.output[2]  # present.0.value
    path = tmp_path / "dec.onnx"
    onnx.save(model, str(path))
    with pytest.raises(LoadError, match=r"present incomplete, missing present\.0\.value"):
        load_model(path)
