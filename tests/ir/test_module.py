"""ir.Module: graph/signature coherence through edits, canonical print, histogram, weight-sharing clone."""
from __future__ import annotations

import pytest
import torch

from llmpress.ir import VerifyError, capture, node_id, source_path

from ..conftest import llama_inputs


def test_capture_runs_like_eager_for_prefill_and_decode(tiny_llama):
    mod = capture(tiny_llama)
    mod.verify()
    x = llama_inputs(tiny_llama, t=5, seed=1)
    ref = tiny_llama(*x)
    out = mod.run(*x)
    # Same ops in the same order on the same inputs: bit-identical.
    assert torch.equal(out[0], ref[0])
    # Dynamic sequence length: the graph exported with T=8 also runs T=1 (decode) from position 5.
    step = (torch.tensor([[3]]), torch.tensor([5]), *out[1:])
    assert torch.equal(mod.run(*step)[0], tiny_llama(*step)[0])


def test_metadata_is_typed_and_stable(tiny_llama):
    mod = capture(tiny_llama)
    linears = [n for n in mod.graph.nodes if n.op == "call_function" and n.target == torch.ops.aten.linear.default]
    paths = [source_path(n) for n in linears]
    assert paths[:3] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                         "model.layers.0.self_attn.v_proj"]
    assert paths[-1] == "lm_head"
    ids = [node_id(n) for n in mod.graph.nodes]
    assert all(ids) and len(set(ids)) == len(ids)
    clone = mod.clone()
    assert [node_id(n) for n in clone.graph.nodes] == ids


def test_print_and_histogram(tiny_llama):
    mod = capture(tiny_llama)
    hist = mod.op_histogram()
    assert hist["aten.linear.default"] == 2 * 7 + 1
    text = mod.print()
    assert "%p_lm_head_weight: float32[64,32] = weight 'lm_head.weight'" in text
    assert text.splitlines()[-1].startswith("return [")
    assert mod.print() == mod.clone().print()  # canonical: same graph, same text


def test_clone_shares_weights_and_isolates_graph(tiny_llama):
    mod = capture(tiny_llama)
    clone = mod.clone()
    for name, t in mod.weights().items():
        assert clone.weights()[name] is t
    node = next(n for n in clone.graph.nodes if n.op == "call_function" and n.target == torch.ops.aten.silu.default)
    with clone.graph.inserting_after(node):
        extra = clone.graph.call_function(torch.ops.aten.neg.default, (node,))
    node.replace_all_uses_with(extra, delete_user_cb=lambda u: u is not extra)
    clone.infer_meta(extra)
    clone.recompile()
    assert clone.op_histogram()["aten.neg.default"] == mod.op_histogram()["aten.neg.default"] + 1


def test_add_and_remove_weights_keep_signature_coherent(tiny_llama):
    mod = capture(tiny_llama)
    x = llama_inputs(tiny_llama, t=5, seed=1)
    before = mod.run(*x)[0]
    n_specs = len(mod.signature.input_specs)
    w = mod.add_weight("extra.packed", torch.zeros(4, 2, dtype=torch.uint8))
    assert mod.weight_name(w) == "extra.packed"
    assert len(mod.signature.input_specs) == n_specs + 1
    mod.recompile()
    mod.verify()
    assert mod.remove_unused_weights() == ["extra.packed"]
    mod.recompile()
    mod.verify()
    assert "extra.packed" not in mod.weights()
    assert torch.equal(mod.run(*x)[0], before)


def test_verify_catches_signature_drift(tiny_llama):
    mod = capture(tiny_llama)
    mod.exported_program.state_dict.pop("lm_head.weight")
    with pytest.raises(VerifyError, match="lm_head.weight"):
        mod.verify()
