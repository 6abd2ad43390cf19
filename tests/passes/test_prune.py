"""``prune``: gated-MLP channels removed so weight shapes shrink; the pruned graph computes the dense model with those
channels zeroed; near misses with reasons; order rules; the real-model floor against a random-channel baseline."""
from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

from llmpress.api import run_pipeline
from llmpress.errors import ConfigError, PassError
from llmpress.ir.capture import capture
from llmpress.ir.meta import compression, source_path
from llmpress.passes.base import PassContext
from llmpress.passes.manager import check_order
from llmpress.passes.pipeline import build, parse
from llmpress.passes.prune import Prune, PruneOptions, channel_scores, kept_channels, kept_count
from llmpress.passes.registry import get_pass

from ..conftest import random_calibration
from .test_gptq import real_calibration
from .test_quantize import fp32_perplexity, perplexity_of, real_model
from .tiny_llama import capture_block, lm_inputs, tiny_llama

LINEAR = torch.ops.aten.linear.default


def _ctx(calib=None, seed: int = 0):
    return PassContext(calibration=calib, progress=False, seed=seed)


def _prune(module, calib=None, **options):
    return Prune(PruneOptions.from_mapping(options, pass_name="prune")).run(module, _ctx(calib))


@pytest.fixture(scope="module")
def tiny():
    model, module = tiny_llama()
    return model, module, random_calibration(n=8, t=32, seed=5)


# -- scores and sizes ------------------------------------------------------------------------------------------------
def test_kept_count_rounds_to_the_multiple() -> None:
    assert kept_count(1024, 0.25, 128) == 768
    assert kept_count(768, 0.25, 32) == 576
    assert kept_count(768, 0.25, 128) == 640  # 576 / 128 = 4.5 rounds up
    assert kept_count(64, 0.9, 32) == 32  # at least one multiple
    assert kept_count(64, 0.1, 32) == 64  # rounds back to all of them: the pass skips that MLP


def test_wanda_score_is_the_output_error_of_removing_the_channel() -> None:
    """``s_j = ||h_j|| ||W_d[:, j]||`` equals ``||h_j W_d[:, j]^T||_F``: how much down's output changes without
    channel j."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(50, 16, generator=g) * torch.linspace(0.1, 3.0, 16)
    wd = torch.randn(8, 16, generator=g)
    s = channel_scores(torch.randn(16, 8), torch.randn(16, 8), wd, score="wanda", sumsq=h.square().sum(0))
    for j in range(16):
        keep = torch.ones(16)
        keep[j] = 0
        err = (h @ wd.T - (h * keep) @ wd.T).norm()
        torch.testing.assert_close(s[j], err, rtol=1e-5, atol=0)
    assert kept_channels(s, 12).tolist() == sorted(kept_channels(s, 12).tolist())  # kept channels keep their order
    assert set(range(16)) - set(kept_channels(s, 12).tolist()) == set(torch.topk(s, 4, largest=False).indices.tolist())


def test_random_score_follows_the_seed() -> None:
    w = torch.randn(16, 8)
    a = channel_scores(w, w, w.T, score="random", seed=1)
    assert torch.equal(a, channel_scores(w, w, w.T, score="random", seed=1))
    assert not torch.equal(a, channel_scores(w, w, w.T, score="random", seed=2))


# -- the pass on a tiny Llama ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("score", ["wanda", "magnitude", "random"])
def test_mlp_weights_shrink_and_the_graph_computes_the_dense_model_without_those_channels(tiny, score: str) -> None:
    model, captured, calib = tiny
    module = captured.clone()
    hist = module.op_histogram()
    res = _prune(module, calib, mlp=0.25, multiple=8, score=score)
    module.verify()
    assert res.modified and module.op_histogram() == hist  # no op added or removed: only shapes change
    st = res.stats
    assert st["pruned"] == 2 and st["skipped"] == [] and st["score"] == score
    assert st["layers"]["model.layers.0.mlp"] == {**st["layers"]["model.layers.0.mlp"], "channels": 64, "kept": 48,
                                                   "removed": 16}
    assert st["bytes_after"] == st["bytes_before"] * 48 // 64
    assert "cache_specs" not in st and module.lm == captured.lm  # heads=0: attention and caches untouched
    weights, dense = module.weights(), captured.weights()
    eager = copy.deepcopy(model)
    for i in range(2):
        p = f"model.layers.{i}.mlp"
        assert weights[f"{p}.gate_proj.weight"].shape == (48, 32) and weights[f"{p}.up_proj.weight"].shape == (48, 32)
        assert weights[f"{p}.down_proj.weight"].shape == (32, 48)
        assert weights[f"model.layers.{i}.self_attn.q_proj.weight"].shape == (32, 32)  # attention untouched
        # which channels were kept: the rows of gate_proj are a subset of the dense rows, in order
        wg = dense[f"{p}.gate_proj.weight"]
        kept = [int((wg == row).all(1).nonzero()) for row in weights[f"{p}.gate_proj.weight"]]
        assert kept == sorted(kept) and len(set(kept)) == 48
        assert torch.equal(weights[f"{p}.up_proj.weight"], dense[f"{p}.up_proj.weight"][kept])
        assert torch.equal(weights[f"{p}.down_proj.weight"], dense[f"{p}.down_proj.weight"][:, kept])
        removed = sorted(set(range(64)) - set(kept))
        with torch.no_grad():
            eager.model.layers[i].mlp.down_proj.weight[:, removed] = 0.0
        node = next(n for n in module.graph.nodes if n.target is LINEAR and source_path(n) == f"{p}.down_proj")
        assert compression(node) == {"pass": "prune", "score": score, "kept": 48, "of": 64, "layer": p}
        assert node.args[0].meta["val"].shape[-1] == 48  # the product's shape followed
    # The pruned graph equals the dense model with the removed channels' down columns zeroed: the channels are gone
    # exactly, the kept ones compute what they did (fp32, only GEMM lengths differ: 1e-5).
    x = lm_inputs(model, 7)
    with torch.no_grad():
        want = eager(*x)
    for a, b in zip(module.run(*x), want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    again = _prune(module, calib, mlp=0.25, multiple=8, score=score)
    assert not again.modified and again.stats["pruned"] == 0
    assert ("model.layers.0.mlp", "already pruned (kept 48 of 64 channels)") in again.stats["skipped"]


def test_wanda_changes_the_logits_less_than_magnitude_or_random(tiny) -> None:
    """Half of every MLP's channels removed; the logits' distance to the dense model's on held-out random tokens."""
    model, captured, calib = tiny
    x = lm_inputs(model, 16)
    dense = captured.run(*x)[0]

    def err(score: str) -> float:
        module = captured.clone()
        _prune(module, calib, mlp=0.5, multiple=8, score=score)
        return float((module.run(*x)[0] - dense).norm() / dense.norm())

    w, m, r = err("wanda"), err("magnitude"), err("random")
    assert w < r and w < m, (w, m, r)


def test_excluded_projection_keeps_its_mlp_whole(tiny) -> None:
    _, captured, _ = tiny
    module = captured.clone()
    res = _prune(module, mlp=0.25, multiple=8, score="magnitude", exclude=("layers.1.mlp.down_proj",))
    assert res.stats["pruned"] == 1
    assert res.stats["skipped"] == [("model.layers.1.mlp", "model.layers.1.mlp.down_proj not selected")]
    assert module.weights()["model.layers.1.mlp.up_proj.weight"].shape == (64, 32)


def test_rounding_that_keeps_every_channel_skips_with_the_reason(tiny) -> None:
    _, captured, _ = tiny
    res = _prune(captured.clone(), mlp=0.1, score="magnitude")  # 0.9 * 64 rounded to a multiple of 32 is 64
    assert not res.modified
    assert ("model.layers.0.mlp", "mlp=0.1 of 64 channels rounded to a multiple of 32 keeps them all") \
        in res.stats["skipped"]


class _SharedProduct(nn.Module):
    """A gated MLP whose product is also read by something besides down_proj: its channels are not prunable."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x, y):
        h = nn.functional.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(h) + y, h.sum(-1)


class _Gated(_SharedProduct):
    def forward(self, x, y):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x)) + y


def test_near_miss_product_read_elsewhere_is_not_pruned() -> None:
    module, x = capture_block("mlp", _SharedProduct().eval())
    before = {k: v.clone() for k, v in module.weights().items()}
    res = _prune(module, mlp=0.5, multiple=8, score="magnitude")
    assert not res.modified and res.stats["pruned"] == 0
    (path, why), = res.stats["skipped"]
    assert path == "mlp" and "not by one down projection alone" in why
    assert all(torch.equal(before[k], v) for k, v in module.weights().items())
    # the same block without the second reader is pruned, and it keeps its biases' kept rows
    module, x = capture_block("mlp", _Gated().eval())
    res = _prune(module, mlp=0.5, multiple=8, score="magnitude")
    assert res.stats["pruned"] == 1 and module.weights()["mlp.gate_proj.bias"].shape == (8,)
    out = module.run(*x)
    assert module.weights()["mlp.down_proj.bias"].shape == (8,)
    assert (out[0] if isinstance(out, (tuple, list)) else out).shape == (3, 8)


def test_order_prune_before_fusion_and_quantizers() -> None:
    for first in ("fuse_gate_up", "fuse_qkv", "quantize(bits=4,group=16)", "kv_quant(bits=8)"):
        with pytest.raises(PassError, match="pass 'prune' cannot run after"):
            check_order(build(f"{first},prune(score=magnitude)"))
    check_order(build("prune(score=magnitude),fuse,quantize(bits=4,group=16),act_quant(bits=8)"))


def test_wanda_needs_calibration(tiny) -> None:
    _, captured, _ = tiny
    assert [p.needs_calibration for p in build("prune,prune(score=magnitude),prune(score=random)")] == \
        [True, False, False]
    with pytest.raises(ConfigError, match=r"prune\(score=wanda\) needs calibration data"):
        _prune(captured.clone())


@pytest.mark.parametrize("options,match", [
    ({"mlp": -0.1}, r"mlp=-0.1 must be in \[0, 1\)"),
    ({"mlp": 1.0}, r"mlp=1.0 must be in \[0, 1\)"),
    ({"heads": 1.0}, r"heads=1.0 must be in \[0, 1\)"),
    ({"mlp": 0.0}, "mlp=0 and heads=0 remove nothing"),
    ({"multiple": 0}, "multiple=0 must be positive"),
    ({"score": "norm"}, "is not one of"),
])
def test_bad_options(options, match) -> None:
    with pytest.raises(ConfigError, match=match):
        PruneOptions.from_mapping(options, pass_name="prune")


def test_registered_and_prints_back() -> None:
    assert get_pass("prune") is Prune
    text = "prune(mlp=0.5,score=random,multiple=64,exclude=lm_head),quantize(bits=4,group=64)"
    assert str(parse(text)) == text and parse(str(parse(text))) == parse(text)


def test_prune_then_quantize_on_the_smaller_shapes(tiny) -> None:
    _, captured, calib = tiny
    module, records = run_pipeline(captured.clone(), "prune(mlp=0.25,multiple=16),fuse,quantize(bits=4,group=16,"
                                   "exclude=lm_head)", calibration=calib, progress=False)
    assert records[0].stats["pruned"] == 2
    hist = module.op_histogram()
    assert hist["llmpress.wq_linear.default"] == 2 * 4  # per layer: qkv_proj, o_proj, gate_up_proj, down_proj
    fused = next(n for n in module.graph.nodes if source_path(n) == "model.layers.0.mlp.gate_up_proj")
    assert fused.meta["val"].shape[-1] == 2 * 48  # gate_up_proj fused the two pruned projections
    assert module.run(*lm_inputs(tiny[0], 5))[0].isfinite().all()


# -- KV-group (head) pruning -----------------------------------------------------------------------------------------
def _zero_removed(eager, module, dense, stats) -> None:
    """In the eager model, zero o_proj's columns of the removed KV groups and down_proj's removed columns."""
    cfg = eager.config
    rep, d = cfg.n_heads // cfg.n_kv_heads, cfg.head_dim
    with torch.no_grad():
        for i, layer in enumerate(eager.model.layers):
            attn = stats["layers"].get(f"model.layers.{i}.self_attn")
            if attn is not None:
                for g in sorted(set(range(cfg.n_kv_heads)) - set(attn["kept_groups"])):
                    layer.self_attn.o_proj.weight[:, g * rep * d:(g + 1) * rep * d] = 0.0
            p = f"model.layers.{i}.mlp"
            if p in stats["layers"]:
                wg = dense[f"{p}.gate_proj.weight"]
                kept = [int((wg == row).all(1).nonzero()) for row in module.weights()[f"{p}.gate_proj.weight"]]
                layer.mlp.down_proj.weight[:, sorted(set(range(wg.shape[0])) - set(kept))] = 0.0


@pytest.mark.parametrize("score", ["wanda", "magnitude"])
def test_heads_whole_kv_groups_shrink_weights_caches_and_lm_info(tiny, score: str) -> None:
    model, captured, calib = tiny
    module = captured.clone()
    res = _prune(module, calib, mlp=0.25, multiple=8, heads=0.5, score=score)
    module.verify()
    st = res.stats
    assert st["pruned"] == 4 and st["skipped"] == []
    attn = st["layers"]["model.layers.1.self_attn"]
    assert {k: attn[k] for k in ("kv_groups", "kept", "removed", "heads", "kept_heads")} == {
        "kv_groups": 2, "kept": 1, "removed": 1, "heads": 4, "kept_heads": 2}
    w = module.weights()
    for i in range(2):
        a = f"model.layers.{i}.self_attn"
        assert w[f"{a}.q_proj.weight"].shape == (16, 32) and w[f"{a}.o_proj.weight"].shape == (32, 16)
        assert w[f"{a}.k_proj.weight"].shape == (8, 32) and w[f"{a}.v_proj.weight"].shape == (8, 32)
    # the KV cache follows: LMInfo, the cache inputs, and what a runner allocates from cache_specs()
    assert module.lm.n_kv_heads == 1 and captured.lm.n_kv_heads == 2
    assert [c["shape"] for c in module.lm.cache_specs()] == [[1, 32, 8]] * 4 == [c["shape"] for c in st["cache_specs"]]
    caches = module.user_inputs()[2:]
    assert [tuple(c.meta["val"].shape) for c in caches] == [(1, 1, 32, 8)] * 4
    # exact: prefill and decode equal the dense model with the removed heads' o columns (and channels) zeroed
    eager = copy.deepcopy(model)
    _zero_removed(eager, module, captured.weights(), st)
    x = lm_inputs(model, 7)
    ids, pos = x[:2]
    got = module.run(ids, pos, *(torch.zeros(1, 1, 32, 8) for _ in range(4)))
    with torch.no_grad():
        want = eager(ids, pos, *model.empty_cache())
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    step = module.run(torch.tensor([[3]]), torch.tensor([7]), *got[1:])
    with torch.no_grad():
        want_step = eager(torch.tensor([[3]]), torch.tensor([7]), *want[1:])
    torch.testing.assert_close(step[0], want_step[0], rtol=1e-5, atol=1e-5)
    again = _prune(module, calib, mlp=0.25, multiple=8, heads=0.5, score=score)
    assert not again.modified
    assert ("model.layers.0.self_attn", "already pruned (kept 1 of 2 KV groups)") in again.stats["skipped"]


def test_heads_later_blocks_calibrate_with_the_smaller_caches() -> None:
    """3 of 4 KV groups kept, 8 query heads: the calibration of block 1 runs block 0 pruned, whose attention needs
    caches of 3 heads (from LMInfo, updated block by block); with 4 it would not even run (4 does not divide 6)."""
    from tests.decoder import Llama, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=8, n_kv_heads=4, hidden_dim=64, max_seq_len=32)
    module = capture(Llama(cfg).eval())
    res = _prune(module, random_calibration(n=4, t=16, seed=5), heads=0.25, mlp=0.0)
    assert res.stats["pruned"] == 2 and module.lm.n_kv_heads == 3 and module.lm.caches == ()
    assert module.weights()["model.layers.1.self_attn.q_proj.weight"].shape == (24, 32)


def test_heads_near_misses_keep_their_reason() -> None:
    from tests.decoder import hf_tiny

    module = capture(hf_tiny("qwen3", vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=64, max_position_embeddings=16))
    res = _prune(module, heads=0.5, mlp=0.0, score="magnitude")
    assert not res.modified and module.lm.n_kv_heads == 2
    (path, why), = res.stats["skipped"]
    assert path == "model.layers.0.self_attn" and "q/k/v do not come from a view of a plain linear" in why
    _, captured = tiny_llama()
    res = _prune(captured, heads=0.2, mlp=0.0, score="magnitude")  # 0.2 of 2 groups rounds to 0
    assert not res.modified
    assert res.stats["skipped"][0][1] == "heads=0.2 of 2 KV groups rounds to 0 removed: must leave between 1 and all"


# -- the real model --------------------------------------------------------------------------------------------------
# 25% of every MLP's 768 channels (576 kept, a multiple of 32 and 64), calibration as test_sparsify's (32 windows of
# 256 tokens from calib.txt), perplexity on test_quantize's 16K-token valid prefix (fp32 24.881). Measured: wanda
# 25.360 (1.0193x), random channels 27.780 (1.1165x), magnitude 25.427 (1.0219x) (20-45 s each on a busy machine,
# about half of it the perplexity on one thread). The floor sits a little above the measurement.
FLOOR = 1.025

@functools.cache
def pruned_perplexity(score: str) -> float:
    module, records = run_pipeline(capture(real_model()[0]), f"prune(mlp=0.25,score={score})",
                                   calibration=real_calibration(), progress=False)
    assert records[0].stats["pruned"] == 8
    return perplexity_of(module)


@pytest.mark.slow
def test_real_model_mlp_quarter_floor_and_beats_random(shared) -> None:
    base = fp32_perplexity()
    wanda = pruned_perplexity("wanda") / base
    rand = pruned_perplexity("random") / base
    print(f"prune mlp=0.25: wanda {wanda:.4f}x, random channels {rand:.4f}x fp32")
    assert wanda <= FLOOR, f"prune(mlp=0.25) wanda: {wanda:.5f}x fp32 (floor {FLOOR}x)"
    assert wanda < rand, f"wanda {wanda:.5f}x is not better than random channels {rand:.5f}x"


