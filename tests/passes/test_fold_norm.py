"""fold_norm: structure, near misses with reasons (tied lm_head, non-linear readers, quantized readers), numerical
exactness on a tiny Llama, a LayerNorm module and the reference model."""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from llmpress.errors import PassError
from llmpress.ir.capture import capture
from llmpress.ir.module import Module
from tests.decoder import Llama
from llmpress.passes.manager import check_order
from llmpress.passes.pipeline import build

from .tiny_llama import lm_inputs, tiny_llama
from .tiny_llama import run_text as _run

from ..conftest import TINYSTORIES, VALID

# fp32 tolerance: (n * g) . w and n . (g * w) round differently, ~1e-7 relative per product; on O(1) outputs of
# length-32 dot products that is ~1e-6, we allow 1e-5.
RTOL, ATOL = 1e-5, 1e-5
_MUL = "aten.mul.Tensor"


def _llama(tie: bool = False) -> tuple[Llama, Module]:
    return tiny_llama(tie=tie, random_norms=True)


@pytest.fixture(scope="module")
def untied():
    return _llama()


@pytest.fixture
def llama(untied):
    model, module = untied
    return model, module.clone()


_inputs = lm_inputs


def _close(got, ref) -> None:
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=RTOL, atol=ATOL)


def test_folds_every_norm_into_its_linears(llama) -> None:
    model, module = llama
    before = module.op_histogram()
    w = {k: v.clone() for k, v in module.weights().items()}
    res = _run(module, "fold_norm")
    assert res.modified and res.stats["skipped"] == []
    assert res.stats["folded"] == 5  # 2 per layer + the final norm (lm_head is not tied)
    assert res.stats["norms"][:2] == ["model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm"]
    after = module.op_histogram()
    assert before[_MUL] - after[_MUL] == 5
    assert after["aten.linear.default"] == before["aten.linear.default"]
    weights = module.weights()
    assert not [k for k in weights if k.endswith("norm.weight")]
    g = w["model.layers.0.input_layernorm.weight"]
    for proj in ("q_proj", "k_proj", "v_proj"):
        name = f"model.layers.0.self_attn.{proj}.weight"
        torch.testing.assert_close(weights[name], w[name] * g[None, :], rtol=0, atol=0)
    torch.testing.assert_close(weights["lm_head.weight"], w["lm_head.weight"] * w["model.norm.weight"][None, :],
                               rtol=0, atol=0)
    module.verify()


def test_numerically_exact_prefill_and_decode(llama) -> None:
    model, module = llama
    prefill, decode = _inputs(model, 7), _inputs(model, 1, start=7)
    ref = [module.run(*prefill), module.run(*decode)]
    assert _run(module, "fold_norm").modified
    _close(module.run(*prefill), ref[0])
    _close(module.run(*decode), ref[1])
    with torch.no_grad():
        eager = model(*prefill)
    torch.testing.assert_close(module.run(*prefill)[0], eager[0], rtol=RTOL, atol=ATOL)


def test_composes_with_both_fusions_in_either_order(llama) -> None:
    model, module = llama
    x = _inputs(model, 5)
    ref = module.run(*x)
    other = module.clone()
    assert _run(module, "fold_norm,fuse_qkv,fuse_gate_up").modified
    assert _run(other, "fuse_qkv,fuse_gate_up,fold_norm").stats["folded"] == 5
    for m in (module, other):
        assert m.op_histogram()["aten.linear.default"] == 15 - 4 - 2
        _close(m.run(*x), ref)


def test_second_run_changes_nothing_and_says_why(llama) -> None:
    _, module = llama
    assert _run(module, "fold_norm").modified
    text = module.print()
    res = _run(module, "fold_norm")
    assert not res.modified and res.stats["folded"] == 0 and "no norm with an affine weight" in res.stats["reason"]
    assert module.print() == text


def test_exclude_keeps_a_norm(llama) -> None:
    _, module = llama
    res = _run(module, "fold_norm(exclude=model.norm)")
    assert res.stats["folded"] == 4
    assert dict(res.stats["skipped"])["model.norm"] == "excluded by 'model.norm'"
    assert "model.norm.weight" in module.weights()


def test_tied_lm_head_is_a_near_miss_unless_untied() -> None:
    model, module = _llama(tie=True)
    x = _inputs(model, 6)
    ref = module.run(*x)
    embed = module.weights()["lm_head.weight"].clone()
    res = _run(module, "fold_norm")
    assert res.stats["folded"] == 4
    why = dict(res.stats["skipped"])["model.norm"]
    assert "shared with model.embed_tokens (tied embeddings)" in why and "untie=true" in why
    torch.testing.assert_close(module.weights()["lm_head.weight"], embed, rtol=0, atol=0)  # embedding unchanged
    _close(module.run(*x), ref)

    res = _run(module, "fold_norm(untie=true)")
    assert res.stats["norms"] == ["model.norm"] and res.stats["untied"] == ["lm_head"]
    weights = module.weights()
    torch.testing.assert_close(weights["lm_head.weight"], embed, rtol=0, atol=0)  # the embedding keeps its table
    assert weights["lm_head.weight_1"].shape == embed.shape  # lm_head reads a private, scaled copy
    _close(module.run(*x), ref)
    module.verify()


def test_after_a_quantizer_is_refused_and_explained(llama) -> None:
    _, module = llama
    with pytest.raises(PassError, match="put fold_norm before quantize"):
        check_order(build("quantize,fold_norm"))
    _run(module, "quantize(bits=8,group=0)")
    text = module.print()
    res = _run(module, "fold_norm")
    assert not res.modified and module.print() == text
    assert "put fold_norm before quantize" in res.stats["reason"]


@pytest.mark.parametrize("then", ["awq", "smoothquant"])
def test_scale_folding_passes_refuse_to_run_after_it(then) -> None:
    """awq and smoothquant fold 1/s into the norm weights fold_norm removes."""
    with pytest.raises(PassError, match=f"put {then} before fold_norm"):
        check_order(build(f"fold_norm,{then}"))
    check_order(build(then))


# -- near misses and LayerNorm on small graphs --------------------------------------------------------------------
class _RMS(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(8) + 0.5)

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))


class _NormThenLinears(nn.Module):
    def __init__(self, norm: nn.Module, bias: bool = False, residual: bool = False) -> None:
        super().__init__()
        self.norm = norm
        self.a = nn.Linear(8, 4, bias=bias)
        self.b = nn.Linear(8, 6, bias=False)
        self.residual = residual

    def forward(self, x):
        h = self.norm(x)
        out = self.a(h).sum(-1, keepdim=True) + self.b(h)
        return out + h[..., :6] if self.residual else out


def _small(net: nn.Module) -> tuple[Module, tuple]:
    torch.manual_seed(0)
    inputs = (torch.randn(3, 8),)
    return capture(net, inputs, dynamic=False), inputs


def test_a_reader_that_is_not_a_linear_is_a_recorded_near_miss() -> None:
    torch.manual_seed(0)
    module, _ = _small(_NormThenLinears(_RMS(), residual=True))
    text = module.print()
    res = _run(module, "fold_norm")
    assert not res.modified and module.print() == text
    assert "which is not a linear's input" in dict(res.stats["skipped"])["norm"]


@pytest.mark.parametrize("bias", [False, True])
def test_layer_norm_weight_and_bias_fold(bias: bool) -> None:
    torch.manual_seed(0)
    ln = nn.LayerNorm(8)
    with torch.no_grad():
        ln.weight.copy_(torch.rand(8) + 0.5)
        ln.bias.copy_(torch.randn(8))
    module, inputs = _small(_NormThenLinears(ln, bias=bias))
    ref = module.run(*inputs)
    res = _run(module, "fold_norm")
    assert res.stats["norms"] == ["norm"]
    lnode = next(n for n in module.graph.nodes if n.target is torch.ops.aten.layer_norm.default)
    assert lnode.args[2] is None and lnode.args[3] is None
    weights = module.weights()
    assert "norm.weight" not in weights and "norm.bias" not in weights
    assert "a.bias" in weights and "b.bias" in weights  # the shift W beta becomes (part of) a bias
    torch.testing.assert_close(module.run(*inputs), ref, rtol=RTOL, atol=ATOL)
    module.verify()


# -- the reference model ------------------------------------------------------------------------------------------
PREFIX_TOKENS = 1024  # 4 windows of 256: a fast check; the fold is exact, so a longer prefix adds nothing


@functools.cache
def _reference() -> tuple:
    from llmpress.eval.perplexity import token_stream
    from llmpress.ir.loaders import load_model

    loaded = load_model(TINYSTORIES, cache_len=256)
    return capture(loaded.model.eval()), tuple(token_stream(VALID, loaded.tokenizer, max_tokens=PREFIX_TOKENS + 1))


def _perplexity(module: Module, stream) -> float:
    from llmpress.eval.perplexity import perplexity

    return perplexity(module.exported_program.module(), module.lm, list(stream), context=256,
                      progress=False).perplexity


def reference_check(text: str, *, linears_removed: int = 0, muls_removed: int = 0) -> None:
    """Run ``text`` on tinystories-llama: logits equal at fp32 tolerance (|logit| <= ~13, atol 1e-4 is ~1e-5
    relative), the op counts move as expected, perplexity on a short valid.txt prefix equal within 1e-5
    relative."""
    base, stream = _reference()
    module = base.clone()
    before = module.op_histogram()
    assert _run(module, text).modified
    after = module.op_histogram()
    assert before["aten.linear.default"] - after["aten.linear.default"] == linears_removed
    assert before[_MUL] - after[_MUL] == muls_removed
    ids = torch.tensor([list(stream[:64])])
    caches = [torch.zeros(1, *c["shape"]) for c in base.lm.cache_specs()]  # float32 [B, heads, len, dim]
    x = (ids, torch.zeros(1, dtype=torch.int64), *caches)
    ref, got = base.run(*x), module.run(*x)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-4)
    p0, p1 = _perplexity(base, stream), _perplexity(module, stream)
    # relative 1e-5: stricter than "equal to 4 significant digits", without the rounding-boundary flakiness of
    # comparing printed digits (an exact rewrite moves it by ~1e-7)
    assert abs(p1 - p0) <= 1e-5 * p0, (p0, p1)


def test_reference_model_logits_and_perplexity(shared) -> None:
    reference_check("fold_norm", muls_removed=17)  # 2 per layer x 8 + the final norm (lm_head is not tied)
