"""autobits: the budget is met exactly as size accounting counts bytes, the allocation is the knapsack optimum, the
emitted pipeline text parses back and, compiled on its own, reproduces the same weights; one real-model test shows
it beats hand-made 3/4-bit mixes at the same bits per weight."""
from __future__ import annotations

import functools
import itertools

import pytest
import torch

import llmpress
from llmpress.api import run_pipeline
from llmpress.errors import ConfigError
from llmpress.eval.size import weight_bytes_by_name
from llmpress.ir.capture import capture
from llmpress.ir.meta import compression
from llmpress.passes.autobits import solve_budget
from llmpress.passes.manager import PassRecord, resolved_pipeline
from llmpress.passes.pipeline import build, parse, print_pipeline
from llmpress.passes.presets import PRESETS

from ..conftest import random_calibration
from .test_gptq import real_calibration
from .test_quantize import fp32_perplexity, perplexity_of, real_model
from .tiny_llama import tiny_llama

# 2g16 stores 2 + 32/16 = 4 bits per weight, 4g16 6, 8g0 8 + 32/32 = 9 (dim 32) or 8.5 (hidden 64) on the tiny Llama.
TINY = "autobits(budget=5.5,candidates=2g16|4g16|8g0,exclude=lm_head)"


def test_solver_finds_the_knapsack_optimum() -> None:
    g = torch.Generator().manual_seed(3)
    for trial in range(5):
        scores = torch.rand(6, 3, generator=g, dtype=torch.float64)
        costs = torch.randint(10, 60, (6, 3), generator=g)
        bound = int(costs.min(1).values.sum() + trial * 25)
        plan = solve_budget(scores, costs, bound)
        fits = [p for p in itertools.product(range(3), repeat=6) if sum(costs[i, c] for i, c in enumerate(p)) <= bound]
        best = min(sum(float(scores[i, c]) for i, c in enumerate(p)) for p in fits)
        assert sum(costs[i, c] for i, c in enumerate(plan)) <= bound
        assert sum(float(scores[i, c]) for i, c in enumerate(plan)) == pytest.approx(best, abs=1e-12)
    assert solve_budget(scores, costs, int(costs.min(1).values.sum()) - 1) is None


@functools.cache
def _tiny():
    return tiny_llama()[1]  # captured once; every test works on a clone


@functools.cache
def _tiny_autobits():
    module, records = run_pipeline(_tiny().clone(), TINY, calibration=random_calibration(), progress=False)
    return module, records[0].stats


def test_budget_is_met_as_size_accounting_counts_it() -> None:
    module, stats = _tiny_autobits()
    numel = sum(v["params"] for v in stats["layers"].values())
    assert numel == 2 * (2 * 32 * 32 + 2 * 16 * 32 + 3 * 32 * 64)  # q, o 32x32; k, v 16x32 (GQA); MLP 32x64
    wq = [n for n in module.graph.nodes if compression(n) and compression(n).get("pass") == "quantize"]
    assert len(wq) == 14 and stats["quantized"] == 14
    stored = weight_bytes_by_name(module)
    after = sum(stored[module.weight_name(a)] for n in wq for a in n.all_input_nodes if module.weight_name(a))
    assert after == stats["bytes_after"] <= stats["bound_bytes"] == int(5.5 * numel / 8)
    assert stats["bits_per_weight"] == pytest.approx(8 * after / numel) and stats["bits_per_weight"] <= 5.5
    assert sum(v > 0 for v in stats["counts"].values()) >= 2, stats["counts"]  # a real mix, not one width
    # Optimal under the recorded scores: exchanging the choices of two layers of the same size keeps the bytes,
    # so it must not lower the summed score.
    layers = list(stats["layers"].values())
    swaps = 0
    for la, lb in itertools.combinations(layers, 2):
        if la["params"] != lb["params"] or la["choice"] == lb["choice"]:
            continue
        swaps += 1
        s = la["scores"]
        t = lb["scores"]
        assert s[la["choice"]] + t[lb["choice"]] <= s[lb["choice"]] + t[la["choice"]] + 1e-12
    assert swaps > 0


def test_emitted_text_parses_back_and_names_each_layer_once() -> None:
    _, stats = _tiny_autobits()
    text = stats["resolved_pipeline"]
    assert print_pipeline(parse(text)) == text and parse(print_pipeline(parse(text))) == parse(text)
    passes = build(text)
    assert {p.name for p in passes} == {"quantize"}
    named = [path for p in passes for path in p.options.include]
    assert sorted(named) == sorted(stats["layers"]) and len(set(named)) == len(named)
    for p in passes:
        choice = {stats["layers"][path]["choice"] for path in p.options.include}
        assert choice == {f"{p.options.bits}g{p.options.group}"}


def test_recompiling_the_manifest_text_reproduces_the_weights() -> None:
    art = llmpress.compile(_tiny().clone(), pipeline=TINY, calibration=random_calibration().batches, progress=False)
    text = art.manifest["resolved_pipeline"]
    assert text == art.passes[0]["stats"]["resolved_pipeline"] and text.startswith("scope(include=")
    again = llmpress.compile(_tiny().clone(), pipeline=text, progress=False)  # no calibration needed
    a, b = art.module.weights(), again.module.weights()
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_bad_options_are_refused_before_any_measurement() -> None:
    module = _tiny()
    calib = random_calibration()
    for text, match in [("autobits(candidates=3x128)", "BITSgGROUP"), ("autobits(candidates=5g16)", "bits=5"),
                        ("autobits(budget=0)", "positive"), ("autobits(candidates=4g16|4g16)", "repeat"),
                        ("autobits(metric=mse)", "metric")]:
        with pytest.raises(ConfigError, match=match):
            build(text)
    with pytest.raises(ConfigError, match="do not fit"):
        run_pipeline(module.clone(), "autobits(candidates=3g48|4g16)", calibration=calib, progress=False)
    with pytest.raises(ConfigError, match="below the smallest plan.*4.0000 bits per weight"):
        run_pipeline(module.clone(), "autobits(budget=3.9,candidates=2g16|4g16,exclude=lm_head)",
                     calibration=calib, progress=False)
    with pytest.raises(ConfigError, match="calibration"):
        run_pipeline(module.clone(), "autobits", progress=False)


# -- the real model --------------------------------------------------------------------------------------------------
# Every linear but lm_head, perplexity on the 16K-token valid prefix of test_quantize (fp32 24.881). RTN int3 / int4
# g128 store 3.25 / 4.25 bits per weight, so a quarter of the parameters at int4 is 3.5: two of the eight blocks, or
# every attention layer. Measured: blocks 0-1 at int4 1.01508x, blocks 6-7 1.02503x, blocks 0 and 4 1.01496x (the best
# mix, used here), attention 1.01530x; autobits(budget=3.5,candidates=3g128|4g128) with KL on 4 x 128 calibration
# tokens 1.01065x (3.4948 b/w), on the 2 x 128 this test uses
# 1.01097x (40 s for the pass on a loaded machine). The floor sits a little above that.
FLOOR = 1.013
MIX = ("scope(include=model.layers.0|model.layers.4)[quantize(bits=4,group=128)],"
       "quantize(bits=3,group=128,exclude=lm_head)")


@pytest.mark.slow
def test_real_model_autobits_beats_a_uniform_mix_at_the_same_bits(shared) -> None:
    base = fp32_perplexity()
    captured = capture(real_model()[0])
    auto, records = run_pipeline(captured.clone(),
                                 "autobits(budget=3.5,candidates=3g128|4g128,samples=2,exclude=lm_head)",
                                 calibration=real_calibration(), progress=False)
    stats = records[0].stats
    mix, _ = run_pipeline(captured, MIX, progress=False)
    mix_bytes = sum(compression(n)["bytes_after"] for n in mix.graph.nodes if compression(n))
    assert stats["quantized"] == 56 and stats["bytes_after"] <= mix_bytes  # 3.5 b/w: the mix's exact size
    r_auto, r_mix = perplexity_of(auto) / base, perplexity_of(mix) / base
    print(f"autobits 3.5 b/w {r_auto:.5f}x ({stats['bits_per_weight']:.4f} b/w, {stats['counts']}), "
          f"mix blocks 0,4 int4 {r_mix:.5f}x fp32")
    assert r_auto <= FLOOR, f"autobits(budget=3.5): {r_auto:.5f}x fp32 (floor {FLOOR}x)"
    assert r_auto < r_mix, f"autobits {r_auto:.5f}x is not better than the int3/int4 mix {r_mix:.5f}x"


@pytest.mark.parametrize("text", [*PRESETS, "scope(include=mlp)[quantize(bits=3,group=64,sym=false)],kv_quant",
                                  "sparsify(method=wanda,pattern=2:4,exclude=lm_head),gptq(bits=4,group=128)",
                                  "factorize(method=svd_llm,ratio=0.7,exclude=lm_head|*.down_proj)"])
def test_resolved_pipeline_rebuilds_every_pass_with_its_options(text: str) -> None:
    # What the manifest records for pipelines without autobits: presets expanded, scopes applied, same passes.
    passes = build(text)
    records = [PassRecord(p.name, p.options.all_dict(), True, {}) for p in passes]
    again = build(resolved_pipeline(records))
    assert [(p.name, p.options) for p in again] == [(p.name, p.options) for p in passes]
