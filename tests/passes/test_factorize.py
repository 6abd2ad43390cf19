"""``factorize``: the factorization of single matrices, rank selection, the pass on a tiny Llama (structure, stats,
skips, outputs, then ``quantize``), option errors, and the real-model floors."""
from __future__ import annotations

import functools
import math
import time

import pytest
import torch
from torch import nn

from llmpress.errors import ConfigError
from llmpress.ir.capture import capture
from llmpress.ir.meta import compression, source_path
from llmpress.passes.base import PassContext
from llmpress.passes.factorize import Factorize, FactorizeOptions, choose_rank, factorize_weight
from llmpress.passes.pipeline import build, parse, print_pipeline
from llmpress.passes.registry import get_pass

from ..conftest import llama_inputs, random_calibration

LINEAR = "aten.linear.default"
WQ = "llmpress.wq_linear.default"


def _correlated(n=1024, d=64, seed=0):
    """Inputs with strongly correlated channels and a few large ones, as LLM activations have."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g) @ torch.randn(8, d, generator=g) + 0.1 * torch.randn(n, d, generator=g)
    x[:, :4] *= 8
    return x


def _stats(x):
    return {"absmean": x.abs().mean(0), "gram": x.double().T @ x.double()}


# -- single matrices -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["svd", "asvd", "svd_llm"])
def test_full_rank_factors_reproduce_w(method: str) -> None:
    """At rank min(m, n) nothing is truncated: ``u @ v`` is ``W`` up to float64 SVD rounding, then one float32
    rounding of each factor (~1e-7 relative; 1e-5 allows the scalings' conditioning)."""
    x = _correlated(d=48)
    w = torch.randn(40, 48, generator=torch.Generator().manual_seed(1))
    f = factorize_weight(w, method=method, rank=40, damp=1e-6, **_stats(x))
    assert f.u.shape == (40, 40) and f.v.shape == (40, 48) and f.u.dtype == torch.float32
    torch.testing.assert_close(f.weight(), w, rtol=0, atol=1e-5 * float(w.abs().max()))
    assert f.energy == pytest.approx(1.0)


def test_rank_by_ratio_rounds_to_the_multiple() -> None:
    # 256x256: p m n / (m + n) = 128 p
    assert choose_rank(256, 256, ratio=0.5, multiple=1) == 64
    assert choose_rank(256, 256, ratio=0.7, multiple=1) == 90  # 89.6
    assert choose_rank(256, 256, ratio=0.7, multiple=32) == 96  # nearest multiple of 32
    assert choose_rank(128, 256, ratio=0.5, multiple=32) == 32  # 42.7 -> 32
    assert choose_rank(768, 256, ratio=0.7, multiple=32) == 128  # 134.4 -> 128
    assert choose_rank(256, 256, ratio=0.05, multiple=32) == 32  # at least one multiple
    # a fixed rank is used as given (no rounding), capped at min(m, n)
    assert choose_rank(256, 256, rank=50, multiple=32) == 50
    assert choose_rank(64, 256, rank=100) == 64


def test_rank_by_energy_is_the_smallest_that_keeps_it() -> None:
    s2 = torch.tensor([50.0, 30.0, 10.0, 5.0, 3.0, 2.0])  # cumulative 0.5, 0.8, 0.9, 0.95, 0.98, 1.0
    assert choose_rank(6, 6, s2, energy=0.8, multiple=1) == 2
    assert choose_rank(6, 6, s2, energy=0.81, multiple=1) == 3
    assert choose_rank(6, 6, s2, energy=0.95, multiple=1) == 4
    assert choose_rank(6, 6, s2, energy=0.5, multiple=4) == 4  # rounded up, never below the energy
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(2))
    f = factorize_weight(w, energy=0.9, multiple=1)
    s = torch.linalg.svdvals(w.double()) ** 2
    cum = (torch.cumsum(s, 0) / s.sum()).tolist()
    assert cum[f.rank - 1] >= 0.9 > cum[f.rank - 2] and f.energy == pytest.approx(cum[f.rank - 1])


def test_svd_llm_minimizes_the_output_error() -> None:
    """On correlated inputs SVD-LLM's truncation minimizes ``||X (W - W_hat)^T||`` (measured 4-5x below plain
    SVD's at rank 16 of 64; ASVD's diagonal scaling lies in between), while plain SVD minimizes ``||W - W_hat||``.
    SVD-LLM's error is exactly the dropped singular values of ``W L``: sqrt(sum S_i^2, i > r)."""
    x = _correlated()
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(3))
    st = _stats(x)
    fs = {m: factorize_weight(w, method=m, rank=16, damp=1e-8, **st) for m in ("svd", "asvd", "svd_llm")}
    out = {m: float(torch.linalg.norm(x @ (w - f.weight()).T)) for m, f in fs.items()}
    frob = {m: float(torch.linalg.norm(w - f.weight())) for m, f in fs.items()}
    assert out["svd_llm"] < 0.5 * out["svd"], out
    assert out["svd_llm"] < out["asvd"] < out["svd"], out
    assert frob["svd"] < frob["asvd"] and frob["svd"] < frob["svd_llm"], frob
    L = torch.linalg.cholesky(st["gram"])
    s = torch.linalg.svdvals(w.double() @ L)
    assert out["svd_llm"] == pytest.approx(float(s[16:].pow(2).sum().sqrt()), rel=1e-3)


def test_svd_llm_dampens_a_singular_gram() -> None:
    x = _correlated(d=32)
    x[:, 7] = 0  # a dead input channel: X^T X is singular
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(4))
    f = factorize_weight(w, method="svd_llm", rank=8, **_stats(x))
    assert torch.isfinite(f.weight()).all()


# -- the pass --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    from tests.decoder import Llama, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=32)
    model = Llama(cfg).eval()
    return model, capture(model)


def _ctx(calib=None):
    return PassContext(calibration=calib, progress=False)


def _linear(module, path):
    return next(n for n in module.graph.nodes if n.op == "call_function" and source_path(n) == path)


def test_single_linear_becomes_two_linears(tiny) -> None:
    """``y = x W^T + b`` -> ``(x A^T) B^T + b``: shapes, source paths, metadata, and the output equals the math."""
    torch.manual_seed(1)
    lin = nn.Linear(96, 80)
    module = capture(nn.Sequential(lin), (torch.randn(3, 96),))
    res = Factorize(FactorizeOptions(rank=24)).run(module, _ctx())
    module.verify()
    assert res.modified and res.stats["factorized"] == 1
    assert module.op_histogram()[LINEAR] == 2
    v, u = [n for n in module.graph.nodes if n.op == "call_function"]
    assert [source_path(v), source_path(u)] == ["0.factor_v", "0.factor_u"]
    wv, wu = module.weight(v.args[1]), module.weight(u.args[1])
    assert wv.shape == (24, 96) and wu.shape == (80, 24)
    assert v.args[0].op == "placeholder" and u.args[0] is v and module.weight(u.args[2]) is not None  # bias on u
    assert "0.weight" not in module.weights()
    layer = res.stats["layers"]["0"]
    assert layer["rank"] == 24 and layer["params_after"] == 24 * 176 and layer["params_before"] == 96 * 80
    assert res.stats["bytes_after"] == 24 * 176 * 4 and res.stats["bytes_before"] == 96 * 80 * 4
    assert compression(u)["rank"] == 24 and compression(u)["pass"] == "factorize" and compression(u)["layer"] == "0"
    x = torch.randn(3, 96)
    out = module.run(x)
    out = out[0] if isinstance(out, (tuple, list)) else out
    torch.testing.assert_close(out, x @ (wu @ wv).T + lin.bias.detach(), rtol=1e-5, atol=1e-5)
    f = factorize_weight(lin.weight, rank=24)
    torch.testing.assert_close(wu @ wv, f.weight(), rtol=0, atol=1e-6)


def test_pass_on_tiny_llama_skips_layers_it_would_not_shrink(tiny) -> None:
    """rank 16: the 32x32 q/o (16 * 64 = 1024 = 32 * 32) and 16x32 k/v do not shrink and are skipped with the
    reason; the 64x32 / 32x64 MLP layers (16 * 96 < 2048) are factorized."""
    _, captured = tiny
    module = captured.clone()
    res = Factorize(FactorizeOptions(rank=16, exclude=("lm_head",))).run(module, _ctx())
    module.verify()
    st = res.stats
    assert st["factorized"] == 6 and sorted(st["layers"]) == sorted(
        f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj"))
    reasons = dict(st["skipped"])
    assert reasons["lm_head"] == "excluded by 'lm_head'"
    assert reasons["model.layers.0.self_attn.q_proj"] == \
        "rank 16 keeps 1,024 >= 1,024 parameters of the 32x32 weight: not smaller"
    assert "not smaller" in reasons["model.layers.1.self_attn.k_proj"]
    assert module.op_histogram()[LINEAR] == 15 + 6
    for path, layer in st["layers"].items():
        assert layer["rank"] == 16 and 0 < layer["rel_error"] < 1 and 0 < layer["energy"] < 1, path


def test_module_output_equals_the_model_with_factored_weights(tiny) -> None:
    """The rewritten graph computes the model with each factorized weight replaced by ``u @ v`` (fp32: the two
    GEMMs sum in another order than one GEMM over ``u @ v``; ~1e-6 on O(1) logits, 1e-5 allowed)."""
    model, captured = tiny
    module = captured.clone()
    res = Factorize(FactorizeOptions(method="svd_llm", rank=8, exclude=("lm_head",))).run(
        module, _ctx(random_calibration()))
    assert res.stats["factorized"] == 14  # rank 8 shrinks every layer: 8 * 64 < 1024, 8 * 48 < 512
    import copy

    ref = copy.deepcopy(model)
    weights = module.weights()
    with torch.no_grad():
        for name, mod in ref.named_modules():
            if isinstance(mod, nn.Linear) and name in res.stats["layers"]:
                mod.weight.copy_(weights[f"{name}.factor_u.weight"] @ weights[f"{name}.factor_v.weight"])
    x = llama_inputs(model)
    for a, b in zip(module.run(*x), ref(*x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert all("output_error" in layer for layer in res.stats["layers"].values())


def test_second_run_changes_nothing(tiny) -> None:
    _, captured = tiny
    module = captured.clone()
    Factorize(FactorizeOptions(ratio=0.5, multiple=4, exclude=("lm_head",))).run(module, _ctx())
    hist = module.op_histogram()
    again = Factorize(FactorizeOptions(ratio=0.5, multiple=4, exclude=("lm_head",))).run(module, _ctx())
    assert not again.modified and again.stats["factorized"] == 0 and module.op_histogram() == hist
    assert ("model.layers.0.mlp.up_proj.factor_u", "already a factor of a factorized layer") in again.stats["skipped"]


def test_energy_ranks_are_reported(tiny) -> None:
    _, captured = tiny
    module = captured.clone()
    res = Factorize(FactorizeOptions(energy=0.5, multiple=8, exclude=("lm_head",))).run(module, _ctx())
    assert res.stats["layers"]
    for path, layer in res.stats["layers"].items():
        assert layer["rank"] % 8 == 0 and layer["energy"] >= 0.5, path


def test_factorize_then_quantize(tiny) -> None:
    """The factors are plain linears: a later ``quantize`` quantizes both (group 8 divides rank 8). Logits SQNR
    against the dense model, measured 14.2 dB factorized alone (rank 8 of 32 on a random model), 14.0 dB with the
    int4 g8 weights on top; floors 2 dB under those, and quantizing must cost something."""
    from llmpress.api import layer_summary, run_pipeline
    from llmpress.passes.quant_common import sqnr_db

    model, captured = tiny
    x = llama_inputs(model)
    ref = captured.run(*x)[0]
    fact, _ = run_pipeline(captured.clone(), "factorize(rank=8,exclude=lm_head)", progress=False)
    both, records = run_pipeline(captured.clone(),
                                 "factorize(rank=8,exclude=lm_head),quantize(bits=4,group=8,exclude=lm_head)",
                                 progress=False)
    both.verify()
    hist = both.op_histogram()
    assert hist[WQ] == 28 and hist[LINEAR] == 1  # 14 layers x 2 factors quantized; lm_head stays
    u = _linear(both, "model.layers.0.self_attn.q_proj.factor_u")
    spec = compression(u)
    assert spec["pass"] == "quantize" and spec["group"] == 8 and spec["rank"] == 8  # factorize's record is kept
    rows = {r["path"]: r for r in layer_summary(both)}
    assert rows["model.layers.0.mlp.down_proj.factor_v"]["compression"]["rank"] == 8
    s_fact, s_both = sqnr_db(ref, fact.run(*x)[0]), sqnr_db(ref, both.run(*x)[0])
    assert s_fact > 12 and s_both > 12 and s_both < s_fact, (s_fact, s_both)


def test_factorize_then_gptq(tiny) -> None:
    """GPTQ quantizes both factors of a layer in one block although the second reads the first's output (its
    Hessian is keyed by the input as collected, before the first factor became a wq_linear)."""
    from llmpress.api import run_pipeline

    _, captured = tiny
    module, records = run_pipeline(captured.clone(), "factorize(rank=8,exclude=lm_head),gptq(bits=4,group=8,"
                                   "exclude=lm_head)", calibration=random_calibration(), progress=False)
    module.verify()
    assert records[1].stats["quantized"] == 28 and module.op_histogram()[WQ] == 28


def test_quantize_group_not_dividing_the_rank_is_reported(tiny) -> None:
    """The rank is the second factor's in_features: a group that does not divide it stops before any work."""
    from llmpress.api import run_pipeline

    _, captured = tiny
    module = captured.clone()
    with pytest.raises(ConfigError, match=r"group=16 does not divide in_features=8 of layer "
                                          r"'model.layers.0.self_attn.q_proj.factor_u'"):
        run_pipeline(module, "factorize(rank=8,exclude=lm_head),quantize(bits=4,group=16,exclude=lm_head)",
                     progress=False)


def test_calibrated_methods_need_calibration_svd_does_not(tiny) -> None:
    from llmpress.api import run_pipeline

    _, captured = tiny
    for method in ("asvd", "svd_llm"):
        module = captured.clone()
        hist = module.op_histogram()
        with pytest.raises(ConfigError, match=f"factorize needs calibration data"):
            run_pipeline(module, f"factorize(method={method},rank=8)", progress=False)
        with pytest.raises(ConfigError, match=rf"factorize\(method={method}\) needs calibration data"):
            Factorize(FactorizeOptions(method=method, rank=8)).run(module, _ctx())
        assert module.op_histogram() == hist
    module, _ = run_pipeline(captured.clone(), "factorize(rank=8)", progress=False)
    assert module.op_histogram()[LINEAR] == 30


@pytest.mark.parametrize("options,match", [
    ({}, "give exactly one of rank=N, ratio=P, energy=E"),
    ({"rank": 8, "ratio": 0.5}, r"exactly one .* \(got rank, ratio\)"),
    ({"ratio": 1.0}, r"ratio=1.0 must be in \(0, 1\)"),
    ({"energy": 0.0}, "energy=0.0"),
    ({"rank": 0}, "rank=0 must be positive"),
    ({"rank": 8, "multiple": 0}, "multiple=0"),
    ({"rank": 8, "method": "svdd"}, "did you mean 'svd'"),
    ({"rank": 8, "damp": 0.0}, "damp=0.0"),
])
def test_bad_options(options, match) -> None:
    with pytest.raises(ConfigError, match=match):
        FactorizeOptions.from_mapping(options, pass_name="factorize")


def test_pipeline_text_round_trips_and_registered() -> None:
    text = "factorize(method=svd_llm,ratio=0.7,exclude=lm_head),quantize(bits=4,group=32)"
    assert print_pipeline(parse(text)) == text
    (p, _) = build(text)
    assert isinstance(p, Factorize) and p.options.ratio == 0.7 and p.needs_calibration
    assert not build("factorize(rank=64)")[0].needs_calibration
    assert get_pass("factorize") is Factorize


# -- the real model --------------------------------------------------------------------------------------------------
# Every linear but lm_head, ranks rounded to multiples of 32 (the default), 32 calibration windows of 256 tokens
# from calib.txt (test_gptq's set), perplexity on the 16K-token valid prefix test_quantize.py scores. Measured at
# ratio 0.5 (49.0% of the factorized parameters kept after rounding): svd 1.0569x fp32, asvd 1.0552x, svd_llm 1.0277x;
# at ratio 0.7 (68.8%): svd 1.0223x, asvd 1.0220x, svd_llm 1.0101x. Quantizing the factors costs more than
# quantizing dense weights: svd_llm 0.7 then RTN int4 g32 1.0371x (plain svd 0.7 then the same: 1.0558x).
@functools.cache
def _factorized(method: str, ratio: float):
    """The reference model factorized once per (method, ratio); later pipelines run on a clone (weights shared)."""
    from llmpress.api import run_pipeline

    from .test_gptq import real_calibration
    from .test_quantize import real_model

    text = f"factorize(method={method},ratio={ratio},exclude=lm_head)"
    module, records = run_pipeline(capture(real_model()[0]), text,
                                   calibration=real_calibration() if method != "svd" else None, progress=False)
    assert records[0].stats["factorized"] == 56
    return module


@functools.cache
def _factorized_ppl(method: str, ratio: float, then: str = "") -> float:
    from llmpress.api import run_pipeline

    from .test_quantize import perplexity_of

    t0 = time.perf_counter()
    module = _factorized(method, ratio)
    if then:
        module, _ = run_pipeline(module.clone(), then, progress=False)
    ppl = perplexity_of(module)
    print(f"factorize({method}, {ratio}){',' + then if then else ''}: ppl {ppl:.4f} ({time.perf_counter() - t0:.1f}s)")
    return ppl


@pytest.mark.slow
def test_real_model_activation_aware_methods_beat_plain_svd_at_half_the_parameters(shared) -> None:
    from .test_quantize import fp32_perplexity

    base = fp32_perplexity()
    r = {m: _factorized_ppl(m, 0.5) / base for m in ("svd", "asvd", "svd_llm")}
    print({m: f"{v:.4f}x" for m, v in r.items()})
    assert r["svd_llm"] < r["asvd"] < r["svd"], r
    assert r["svd"] <= 1.065 and r["asvd"] <= 1.063 and r["svd_llm"] <= 1.035, r


@pytest.mark.slow
def test_real_model_svd_llm_then_int4_floor(shared) -> None:
    from .test_quantize import fp32_perplexity

    base = fp32_perplexity()
    ratio = _factorized_ppl("svd_llm", 0.7, "quantize(bits=4,group=32,exclude=lm_head)") / base
    alone = _factorized_ppl("svd_llm", 0.7) / base
    print(f"svd_llm 0.7: {alone:.4f}x, + int4 g32: {ratio:.4f}x")
    assert alone <= 1.015, alone
    assert ratio <= 1.045, ratio
