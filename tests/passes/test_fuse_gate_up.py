"""fuse_gate_up: structure, near misses with reasons, numerical exactness on a tiny Llama and the reference model."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from llmpress.errors import PassError
from llmpress.ir.capture import capture
from llmpress.ir.meta import source_path
from llmpress.ir.module import Module
from tests.decoder import Llama
from llmpress.passes.manager import check_order
from llmpress.passes.pipeline import build

from .tiny_llama import llama, llama_and_module  # noqa: F401 - the shared fixtures
from .tiny_llama import assert_exact_rewrite, capture_block, lm_inputs
from .tiny_llama import run_text as _run

# fp32 tolerance: the fused GEMM computes the same length-32 dot products, but BLAS may block the wider matrix
# differently and so sum in another order; fp32 reordering error on O(1) outputs is ~1e-6, we allow 1e-5.
RTOL, ATOL = 1e-5, 1e-5


_inputs = lm_inputs


def test_fuses_gate_up_in_every_layer(llama) -> None:
    _, module = llama
    before = module.op_histogram()
    w = {k: v.clone() for k, v in module.weights().items()}
    res = _run(module, "fuse_gate_up")
    assert res.modified
    assert res.stats["fused"] == 2 and res.stats["skipped"] == []
    assert res.stats["groups"] == ["model.layers.0.mlp.gate_up_proj", "model.layers.1.mlp.gate_up_proj"]
    after = module.op_histogram()
    assert after["aten.linear.default"] - before["aten.linear.default"] == -2  # one matmul fewer per layer
    assert after["aten.split_with_sizes.default"] - before["aten.split_with_sizes.default"] == 2
    assert after["getitem"] - before["getitem"] == 4
    assert after["aten.silu.default"] == before["aten.silu.default"]
    weights = module.weights()
    for i in range(2):
        p = f"model.layers.{i}.mlp"
        assert f"{p}.gate_proj.weight" not in weights and f"{p}.up_proj.weight" not in weights
        fused = weights[f"{p}.gate_up_proj.weight"]
        assert fused.shape == (2 * 64, 32)  # out = 2 * intermediate
        assert torch.equal(fused, torch.cat([w[f"{p}.gate_proj.weight"], w[f"{p}.up_proj.weight"]]))
    # The split's first half feeds silu, the second the multiply.
    silu = next(n for n in module.graph.nodes if n.target is torch.ops.aten.silu.default)
    assert silu.args[0].args[1] == 0 and source_path(silu.args[0]) == "model.layers.0.mlp.gate_up_proj"
    assert len(module.nodes_by_source("*.gate_up_proj")) == 2 * 4  # linear, split, 2 getitems per layer
    module.verify()


def test_numerically_exact_prefill_and_decode(llama) -> None:
    model, module = llama
    assert_exact_rewrite(model, module, lambda m: _run(m, "fuse_gate_up"), rtol=RTOL, atol=ATOL)


def test_second_run_changes_nothing_and_says_why(llama) -> None:
    _, module = llama
    assert _run(module, "fuse_gate_up").modified
    text = module.print()
    res = _run(module, "fuse_gate_up")
    assert not res.modified and res.stats["fused"] == 0
    assert res.stats["reason"] == "the gate/up projections are already fused"
    assert module.print() == text


def test_composes_with_fuse_qkv(llama) -> None:
    model, module = llama
    x = _inputs(model, 5)
    ref = module.run(*x)
    assert _run(module, "fuse_qkv,fuse_gate_up").modified
    assert module.op_histogram()["aten.linear.default"] == 15 - 4 - 2
    for a, b in zip(ref, module.run(*x)):
        torch.testing.assert_close(b, a, rtol=RTOL, atol=ATOL)


def test_exclude_filters_after_structure(llama) -> None:
    _, module = llama
    res = _run(module, "fuse_gate_up(exclude=model.layers.0)")
    assert res.stats["groups"] == ["model.layers.1.mlp.gate_up_proj"]
    reasons = dict(res.stats["skipped"])
    assert reasons["model.layers.0.mlp.gate_proj"] == "excluded by 'model.layers.0'"
    assert "model.layers.0.self_attn.q_proj" not in reasons  # only gate/up candidates are reported


def test_fused_layer_quantizes_like_any_linear(llama) -> None:
    """Quantization is per output row and group, so fusing first gives the same weights and the same outputs."""
    model, module = llama
    x = _inputs(model, 6)
    plain = module.clone()
    _run(plain, "quantize(bits=4,group=32)")
    check_order(build("fuse_gate_up,quantize(bits=4,group=32)"))
    res = _run(module, "fuse_gate_up,quantize(bits=4,group=32)")
    assert res.modified
    wq = [n for n in module.nodes_by_source("*.gate_up_proj")
          if getattr(n.target, "name", lambda: "")() == "llmpress::wq_linear"]
    assert len(wq) == 2
    for a, b in zip(plain.run(*x), module.run(*x)):
        torch.testing.assert_close(b, a, rtol=RTOL, atol=ATOL)


def test_after_a_quantizer_is_refused_and_explained(llama) -> None:
    _, module = llama
    with pytest.raises(PassError, match="put fuse_gate_up before quantize"):
        check_order(build("quantize,fuse_gate_up"))
    _run(module, "quantize(bits=8,group=0)")
    text = module.print()
    res = _run(module, "fuse_gate_up")  # run directly, bypassing the manager's order check
    assert not res.modified and module.print() == text
    assert "put fuse_gate_up before quantize" in res.stats["reason"]
    assert "already quantized" in dict(res.stats["skipped"])["model.layers.0.mlp.gate_proj"]


# -- near misses on small graphs ----------------------------------------------------------------------------------
class _MLP(nn.Module):
    def __init__(self, bias=(False, False), up_input: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(8, 16, bias=bias[0])
        self.up_proj = nn.Linear(8, 16, bias=bias[1])
        self.down_proj = nn.Linear(16, 8, bias=False)
        self.up_input = up_input

    def forward(self, x, y):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(y if self.up_input else x))


def _small(mlp: nn.Module) -> tuple[Module, tuple]:
    return capture_block("mlp", mlp)


def test_up_reading_another_input_is_a_recorded_near_miss() -> None:
    module, _ = _small(_MLP(up_input=True))
    text = module.print()
    res = _run(module, "fuse_gate_up")
    assert not res.modified and module.print() == text
    reasons = dict(res.stats["skipped"])
    assert reasons["mlp.up_proj"].startswith("gate_proj and up_proj read different inputs")
    assert "no gate/up pair qualified" in res.stats["reason"]


def test_bias_presence_must_agree() -> None:
    module, _ = _small(_MLP(bias=(True, False)))
    res = _run(module, "fuse_gate_up")
    assert not res.modified
    assert dict(res.stats["skipped"])["mlp.up_proj"] == "bias presence differs from gate_proj"


def test_biases_are_concatenated() -> None:
    module, inputs = _small(_MLP(bias=(True, True)))
    ref = module.run(*inputs)
    res = _run(module, "fuse_gate_up")
    assert res.stats["groups"] == ["mlp.gate_up_proj"]
    w = module.weights()
    assert w["mlp.gate_up_proj.bias"].shape == (32,) and "mlp.gate_proj.bias" not in w
    torch.testing.assert_close(module.run(*inputs), ref, rtol=RTOL, atol=ATOL)
    module.verify()


def test_no_gated_mlp_says_so() -> None:
    module = capture(nn.Sequential(nn.Linear(8, 8), nn.SiLU(), nn.Linear(8, 8)), (torch.randn(2, 8),),
                     dynamic=False)
    res = _run(module, "fuse_gate_up")
    assert not res.modified and "no gated MLP" in res.stats["reason"]


# -- the reference model ------------------------------------------------------------------------------------------
def test_reference_model_logits_and_matmul_count(shared) -> None:
    """tinystories-llama (8 layers): one matmul fewer per layer, logits equal at fp32 tolerance (|logit| <= ~13;
    atol 1e-4 is ~1e-5 relative) and perplexity on a short valid.txt prefix equal within 1e-5 relative."""
    from .test_fold_norm import reference_check

    reference_check("fuse_gate_up", linears_removed=8)
