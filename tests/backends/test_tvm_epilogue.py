"""The SwiGLU epilogue of the CPU linear kernels (``kernels/epilogue.py``): what the dispatch pass matches and why
near misses are not matches (Relax only, no build), and whole tiny Llamas built for ``cpu`` (every build this host
runs: the AVX2 base and its AVX-512 VNNI variant) against the reference, prefill and one decode step.

Tolerance as ``model_checks.py``: fp32 kernels summing in another order than PyTorch, 1e-5 of the logits' scale
(a wrong row permutation would mix gate and up rows: off by O(1))."""
from __future__ import annotations

import ast

import pytest
import torch
from torch import nn

pytest.importorskip("tvm")

from ..passes.tiny_llama import capture_block  # noqa: E402

pytestmark = [pytest.mark.tvm, pytest.mark.cpu_variants]


def _dispatched(module, *, epilogues: bool = True, relax_mod=None, functions=None):
    """``(stats, Relax module)`` after the CPU dispatch pass (AVX-512 VNNI instruction set) over ``module``
    translated to Relax (or over ``relax_mod``, a translation already made)."""
    import tvm

    from llmpress.backends.tvm.isa import cpu_isa
    from llmpress.backends.tvm.kernels.dispatch import EPILOGUE_STATS_ATTR, dispatch_quant_kernels
    from llmpress.backends.tvm.lower import to_relax

    if relax_mod is None:
        relax_mod = to_relax(module, inplace_cache=True, cpu_kernels=True).mod
    isa = cpu_isa(tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4"}))
    mod = dispatch_quant_kernels(isa, epilogues=epilogues, functions=functions)(relax_mod)
    return ast.literal_eval(str(mod.attrs[EPILOGUE_STATS_ATTR])), mod


def _llama(dim: int, hidden: int, pipeline: str, *, bias: bool = False):
    """A one-layer Llama through ``pipeline``; ``bias``: q/k/v/o with biases (Qwen2-like, ``bias.py``'s epilogue)."""
    from llmpress.api import run_pipeline
    from llmpress.ir.capture import capture
    from tests.decoder import hf_tiny

    hf = hf_tiny("llama", vocab_size=64, hidden_size=dim, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=hidden, max_position_embeddings=16, attention_bias=bias)
    module, records = run_pipeline(capture(hf), pipeline, progress=False)
    assert next(r for r in records if r.name == "fuse_gate_up").stats["groups"] == ["model.layers.0.mlp.gate_up_proj"]
    return module


def _ops(mod, func: str) -> str:
    return str(mod[func])


def test_fused_gate_up_gets_the_epilogue_in_every_function():
    from llmpress.backends.tvm.lower import to_relax

    relax_mod = to_relax(_llama(128, 256, "fuse_gate_up"), inplace_cache=True, cpu_kernels=True).mod
    stats, mod = _dispatched(None, relax_mod=relax_mod)
    assert stats["swiglu_fused"] == 3 and stats["swiglu_near_misses"] == []  # prefill, decode, prefill_last
    for func in ("prefill", "decode"):
        text = _ops(mod, func)
        assert "R.nn.silu" not in text and "R.split" not in text
    assert "llmpress_fgemv_avx512vnni_512_128_swiglu" in _ops(mod, "decode")
    assert "llmpress_fgemm_avx512vnni_512_128_swiglu" in _ops(mod, "prefill")
    off, mod_off = _dispatched(None, epilogues=False, relax_mod=relax_mod)
    assert off["swiglu_fused"] == 0 and "R.nn.silu" in _ops(mod_off, "decode")
    assert "swiglu" not in _ops(mod_off, "decode")


def test_residual_add_and_rmsnorm_become_one_kernel():
    """Per function: the post-attention norm and the final norm read a residual add (6 in all); the first norm
    reads the embedding and stays as it is. Numerics: the model tests below (every build runs the fused kernel;
    w4a8 with norm weights, fp32 with folded ones)."""
    from llmpress.backends.tvm.kernels.add_norm import fuse_add_norm
    from llmpress.backends.tvm.lower import to_relax

    relax_mod = to_relax(_llama(128, 256, "fold_norm,fuse_gate_up"), inplace_cache=True, cpu_kernels=True).mod
    mod = fuse_add_norm()(relax_mod)
    stats = ast.literal_eval(str(mod.attrs["llmpress.add_norm"]))
    assert stats == {"fused": 6, "near_misses": []}
    decode = _ops(mod, "decode")
    assert decode.count("R.rsqrt") == 1  # the embedding's norm
    assert decode.count("R.call_tir(llmpress_add_norm_d128_t1,") == 2  # weights folded into the next linears
    assert _ops(mod, "prefill").count("R.call_tir(llmpress_add_norm_d128_tNone,") == 2


class _GatedMLP(nn.Module):
    """``act(h[:, :32]) * h[:, 32:]`` over one linear ``h``, in the variants a near miss needs."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(8, 64, bias=False)
        self.kind = kind

    def forward(self, x, y):
        g, u = self.gate_up_proj(x).split(32, -1)
        if self.kind == "gelu":
            return nn.functional.gelu(g) * u
        if self.kind == "swapped":
            return nn.functional.silu(u) * g
        return nn.functional.silu(g) * u + g  # g has another reader


@pytest.mark.parametrize("kind, why", [("gelu", "activation relax.nn.gelu is not silu"),
                                       ("swapped", "silu reads the second half of the split, not the first"),
                                       ("reused", "has other readers")])
def test_near_misses_are_reported_with_their_reason(kind, why):
    module, _ = capture_block("mlp", _GatedMLP(kind))
    stats, _ = _dispatched(module)
    assert stats["swiglu_fused"] == 0
    assert len(stats["swiglu_near_misses"]) == 1 and why in stats["swiglu_near_misses"][0], stats


def _check_builds(module, dim_note: str, epilogues: bool | str = True):
    """Every build of ``cpu`` this host runs: prefill of 6 tokens, then one decode step, against the reference."""
    from llmpress.backends.tvm import TVMBackend
    from llmpress.backends.tvm.targets import missing_features
    from llmpress.eval.generate import empty_cache

    compiled = TVMBackend(epilogues=epilogues).lower(module, "cpu", progress=False)
    ids, zero = torch.tensor([[1, 5, 9, 3, 7, 2]]), torch.zeros(1, dtype=torch.int64)
    ref = module.run(ids, zero, *empty_cache(module.lm))
    ref_step = module.run(torch.tensor([[4]]), torch.tensor([6]), *ref[1:])
    ran = []
    for spec in [compiled.spec, *[v for v, _, _ in compiled.variants]]:
        if missing_features(spec):
            continue
        compiled.use_build(spec.name)
        got = compiled(ids, zero, *empty_cache(module.lm))
        step = compiled(torch.tensor([[4]]), torch.tensor([6]), *[torch.as_tensor(c).clone() for c in got[1:]])
        for a, b in [*zip(got, ref), (step[0], ref_step[0])]:
            torch.testing.assert_close(torch.as_tensor(a), b, rtol=0, atol=1e-5 * float(b.abs().max()) + 1e-6,
                                       msg=lambda m: f"{spec.name} ({dim_note}): {m}")
        ran.append(spec.name)
    assert ran, "no build of cpu runs on this host"


def test_w4a8_swiglu_epilogue_matches_reference():
    """Integer GEMV/GEMM (256- and 512-bit forms) with the epilogue, 4-bit weights, int8 activations; q/k/v/o with
    the bias epilogue (``test_tvm_bias_epilogue.py``)."""
    _check_builds(_llama(128, 256, "fuse_gate_up,quantize(bits=4,group=128,exclude=lm_head),act_quant(bits=8)",
                         bias=True), "w4a8, biased q/k/v/o")


def test_w4a16_swiglu_epilogue_matches_reference():
    """Float-activation GEMV (``gemv_float_func``) with the epilogue: 4-bit weights, float32 activations; 96 gate/up
    outputs per tile group so the vector ``silu_mul`` (``epilogue.swiglu_flush``) covers whole steps."""
    _check_builds(_llama(128, 192, "fuse_gate_up,quantize(bits=4,group=32,exclude=lm_head)"), "w4a16")


def test_fp32_swiglu_epilogue_matches_reference():
    """Float32 GEMV (decode) and GEMM (prefill, K in one cache block) with the epilogue; folded norms (the add +
    norm kernel without a weight) and the final norm (with one: tied ``lm_head``, not folded); q/k/v/o with the bias
    epilogue."""
    _check_builds(_llama(128, 256, "fold_norm,fuse_gate_up", bias=True), "fp32, biased q/k/v/o")


@pytest.mark.slow
def test_fp32_unpermuted_gemm_matches_reference():
    """At K = 1056 (> one 1024-feature cache block) the float32 GEMM has no epilogue form: prefill keeps the
    permuted weights (shared with decode, which fuses) and puts its output back in order (``epilogue.unpermute``)."""
    module = _llama(1056, 64, "fuse_gate_up")
    stats, _ = _dispatched(module)
    assert stats["swiglu_fused"] == 1 and stats["swiglu_unpermuted"] == 2  # decode; prefill and prefill_last
    _check_builds(module, "fp32, K 1056")


def test_decode_only_epilogues_match_reference():
    """``epilogues="decode"``: decode's gate/up kernel writes silu(gate) * up; prefill's reads the same SwiGLU-layout
    weights with the plain integer GEMM and puts its output back in weight order (the quantized ``unpermute``
    path) for the separate silu kernel; add + RMSNorm fused in decode only."""
    module = _llama(128, 256, "fuse_gate_up,quantize(bits=4,group=128,exclude=lm_head),act_quant(bits=8)")
    stats, _ = _dispatched(module, functions=("decode",))
    assert stats["swiglu_fused"] == 1 and stats["swiglu_unpermuted"] == 2  # decode; prefill and prefill_last
    _check_builds(module, "w4a8, epilogues in decode only", epilogues="decode")
