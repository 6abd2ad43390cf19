"""fuse_qkv: structure, near misses with reasons, numerical exactness on a tiny Llama."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from llmpress.ir.meta import source_path
from llmpress.ir.module import Module
from tests.decoder import Llama
from llmpress.passes.fuse_qkv import FuseQKV

from .tiny_llama import llama, llama_and_module  # noqa: F401 - the shared fixtures
from .tiny_llama import assert_exact_rewrite, capture_block, lm_inputs
from .tiny_llama import run_text as _run

# fp32 tolerance: the fused GEMM computes the same length-32 dot products, but BLAS may block the wider matrix
# differently and so sum in another order; fp32 reordering error on O(1) outputs is ~1e-6, we allow 1e-5.
RTOL, ATOL = 1e-5, 1e-5


_inputs = lm_inputs


def test_fuses_qkv_in_every_layer(llama) -> None:
    model, module = llama
    before = module.op_histogram()
    w = {k: v.clone() for k, v in module.weights().items()}
    res = _run(module, "fuse_qkv")
    assert res.modified
    assert res.stats["fused"] == 2
    assert res.stats["groups"] == ["model.layers.0.self_attn.qkv_proj", "model.layers.1.self_attn.qkv_proj"]
    after = module.op_histogram()
    assert after["aten.linear.default"] - before["aten.linear.default"] == -4  # 6 -> 2 in the attention
    assert after["aten.split_with_sizes.default"] - before["aten.split_with_sizes.default"] == 2
    assert after["getitem"] - before["getitem"] == 6
    weights = module.weights()
    for i in range(2):
        p = f"model.layers.{i}.self_attn"
        assert f"{p}.q_proj.weight" not in weights and f"{p}.v_proj.weight" not in weights
        fused = weights[f"{p}.qkv_proj.weight"]
        assert fused.shape == (32 + 16 + 16, 32)
        assert torch.equal(fused, torch.cat([w[f"{p}.q_proj.weight"], w[f"{p}.k_proj.weight"],
                                             w[f"{p}.v_proj.weight"]]))
    fused_nodes = [n for n in module.graph.nodes if n.op == "call_function"
                   and source_path(n) == "model.layers.0.self_attn.qkv_proj"]
    assert len(fused_nodes) == 5  # linear, split, 3 getitems
    # gate/up share an input too: recorded as near misses, not fused.
    reasons = dict(res.stats["skipped"])
    assert "not q/k/v" in reasons["model.layers.0.mlp.gate_proj"]
    module.verify()


def test_numerically_exact_prefill_and_decode(llama) -> None:
    model, module = llama
    assert_exact_rewrite(model, module, lambda m: _run(m, "fuse_qkv"), rtol=RTOL, atol=ATOL)


def test_second_run_changes_nothing(llama) -> None:
    _, module = llama
    assert _run(module, "fuse_qkv").modified
    text = module.print()
    res = _run(module, "fuse_qkv")
    assert not res.modified and res.stats["fused"] == 0
    assert module.print() == text


def test_exclude_filters_after_structure(llama) -> None:
    _, module = llama
    res = _run(module, "fuse_qkv(exclude=model.layers.0)")
    assert res.stats["groups"] == ["model.layers.1.self_attn.qkv_proj"]
    reasons = dict(res.stats["skipped"])
    assert reasons["model.layers.0.self_attn.k_proj"] == "excluded by 'model.layers.0'"
    assert "lm_head" not in reasons  # only q/k/v candidates are reported


def test_all_siblings_fuses_gate_up(llama) -> None:
    model, module = llama
    x = _inputs(model, 5)
    ref = module.run(*x)
    res = _run(module, "fuse_qkv(all_siblings=true,min_group=2)")
    assert sorted(res.stats["groups"]) == sorted(
        [f"model.layers.{i}.self_attn.qkv_proj" for i in range(2)] + [f"model.layers.{i}.mlp.gate_up_proj"
                                                                     for i in range(2)])
    assert module.weights()["model.layers.0.mlp.gate_up_proj.weight"].shape == (128, 32)
    assert module.op_histogram()["aten.linear.default"] == 15 - 4 - 2
    for a, b in zip(ref, module.run(*x)):
        torch.testing.assert_close(b, a, rtol=RTOL, atol=ATOL)


# -- near misses on small graphs ----------------------------------------------------------------------------------
class _Attn(nn.Module):
    def __init__(self, bias=(False, False, False), k_input: bool = False) -> None:
        super().__init__()
        self.q_proj = nn.Linear(8, 8, bias=bias[0])
        self.k_proj = nn.Linear(8, 4, bias=bias[1])
        self.v_proj = nn.Linear(8, 4, bias=bias[2])
        self.k_input = k_input

    def forward(self, x, y):
        k = self.k_proj(y if self.k_input else x)
        return self.q_proj(x)[..., :4] * k + self.v_proj(x)


def _small(attn: nn.Module) -> tuple[Module, tuple]:
    return capture_block("self_attn", attn)


def test_k_reading_another_input_is_a_recorded_near_miss() -> None:
    module, _ = _small(_Attn(k_input=True))
    text = module.print()
    res = _run(module, "fuse_qkv")
    assert not res.modified and module.print() == text
    reasons = dict(res.stats["skipped"])
    assert "k_proj reads a different input" in reasons["self_attn.q_proj"]
    assert "min_group=3" in reasons["self_attn.k_proj"]


def test_min_group_2_fuses_the_pair_that_shares_an_input() -> None:
    module, inputs = _small(_Attn(k_input=True))
    ref = module.run(*inputs)
    res = _run(module, "fuse_qkv(min_group=2)")
    assert res.stats["groups"] == ["self_attn.qv_proj"]
    assert module.weights()["self_attn.qv_proj.weight"].shape == (12, 8)
    torch.testing.assert_close(module.run(*inputs), ref, rtol=RTOL, atol=ATOL)


def test_bias_presence_must_agree() -> None:
    module, _ = _small(_Attn(bias=(True, True, False)))
    text = module.print()
    res = _run(module, "fuse_qkv")
    assert not res.modified and module.print() == text
    assert dict(res.stats["skipped"])["self_attn.v_proj"] == "bias presence differs from q_proj"


def test_biases_are_concatenated() -> None:
    module, inputs = _small(_Attn(bias=(True, True, True)))
    ref = module.run(*inputs)
    res = _run(module, "fuse_qkv")
    assert res.modified
    w = module.weights()
    assert w["self_attn.qkv_proj.bias"].shape == (16,) and "self_attn.q_proj.bias" not in w
    torch.testing.assert_close(module.run(*inputs), ref, rtol=RTOL, atol=ATOL)
    module.verify()


def test_tied_weight_is_not_fused() -> None:
    attn = _Attn()
    attn.v_proj = attn.k_proj  # v reuses k's weight: fusing would store it twice
    module, _ = _small(attn)
    res = _run(module, "fuse_qkv(min_group=2)")
    reasons = dict(res.stats["skipped"])
    assert any("tied" in r for r in reasons.values()), reasons


def test_options_are_validated() -> None:
    from llmpress.errors import ConfigError

    with pytest.raises(ConfigError, match="min_group"):
        FuseQKV.Options.from_mapping({"min_group": 4})
    assert FuseQKV.Options.from_mapping({"min_group": 4, "all_siblings": True}).min_group == 4
